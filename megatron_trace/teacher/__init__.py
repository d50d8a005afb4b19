"""The privileged teacher: prompt building and position alignment (forward lands with the trainer)."""

from .context import DEFAULT_TEMPLATE, TeacherInput, build_teacher_input, privileged_prompt

__all__ = ["DEFAULT_TEMPLATE", "TeacherInput", "build_teacher_input", "privileged_prompt"]
