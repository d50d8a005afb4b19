"""The privileged teacher: what it sees (`teacher.context`), prompt building and position alignment."""

from .context import DEFAULT_TEMPLATE, TEACHER_CONTEXTS, TeacherInput, build_teacher_input, privileged_prompt

__all__ = ["DEFAULT_TEMPLATE", "TEACHER_CONTEXTS", "TeacherInput", "build_teacher_input", "privileged_prompt"]
