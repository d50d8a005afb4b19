"""The privileged teacher context: what the teacher sees, and where its logits line up.

The teacher is the policy itself, prompted with privileged information. What it sees is
`teacher.context` (the paper agrees only on the diagnostic type, so each reading is a setting):
  solution_and_type  the reference solution and the annotator's coarse diagnostic type (default)
  type_only          the diagnostic type alone (no solution: runs on answer-only data)
  answer_and_type    the verified final answer and the diagnostic type
  solution           the reference solution alone
It never sees the annotated span text (the builder does not even receive it), and the
annotator's own inputs do not depend on this setting. With `data.answer_only_teacher` a row
without a solution shows its gold answer in the solution's place. The student's response tokens
follow unchanged, so the teacher scores exactly the tokens the student produced.

Alignment: with a prompt of P tokens, response token i sits at teacher position P + i and is
predicted by the logits at position P + i - 1 (for the student, S + i - 1 with its own prompt
length S). `TeacherInput.logit_positions` lists those teacher positions.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_TEMPLATE", "TEACHER_CONTEXTS", "TeacherInput", "build_teacher_input", "privileged_prompt"]

# teacher.context: what the privileged prompt shows (see the module docstring).
TEACHER_CONTEXTS = ("solution_and_type", "type_only", "answer_and_type", "solution")

DEFAULT_TEMPLATE = (
    "{problem}\n\n"
    "{solution_block}"
    "{diagnostic_block}"
    "Please reason step by step, and put your final answer within \\boxed{{}}."
)
SOLUTION_BLOCK = "A verified reference solution, for your eyes only:\n{solution}\n\n"
# In the solution block's place when a row has no solution but an answer (data.answer_only_teacher).
ANSWER_BLOCK = "No reference solution is available, but the verified final answer is: {answer}\n\n"
# The synthetic task's compact form (no chat template, no instruction; see data.problems.math_prompt).
ARITH_TEMPLATE = "{problem}\n{solution_block}{diagnostic_block}"
ARITH_SOLUTION_BLOCK = "Reference:\n{solution}\n"
ARITH_ANSWER_BLOCK = "Answer: {answer}\n"
ARITH_DIAGNOSTIC_BLOCKS = {True: "Key steps: {diagnostic}\n", False: "Mistake: {diagnostic}\n"}

DIAGNOSTIC_BLOCKS = {
    True: "A reviewer marked the decisive steps of a correct attempt as: {diagnostic}.\n\n",
    False: "A reviewer found that an earlier attempt made a mistake of type: {diagnostic}.\n\n",
}


@dataclass(frozen=True)
class TeacherInput:
    input_ids: list[int]  # [P + n] privileged prompt, then the response tokens unchanged
    prompt_len: int  # P

    @property
    def num_response_tokens(self) -> int:
        return len(self.input_ids) - self.prompt_len

    @property
    def logit_positions(self) -> list[int]:
        """Teacher positions whose logits predict response tokens 0..n-1."""
        return list(range(self.prompt_len - 1, len(self.input_ids) - 1))


def privileged_prompt(problem: str, solution: str | None, diagnostic: str | None, correct: bool,
                      template: str = DEFAULT_TEMPLATE, kind: str = "math", answer: str | None = None,
                      context: str = "solution_and_type") -> str:
    """The teacher's user turn (before the chat template). kind="arith": the compact form.

    context: `teacher.context`. answer: the gold answer; shown by answer_and_type, and by the
    solution contexts in the solution's place when the row has none (the caller passes it there
    only under data.answer_only_teacher)."""
    if context not in TEACHER_CONTEXTS:
        raise ValueError(f"teacher.context: unknown {context!r}; choose one of {list(TEACHER_CONTEXTS)}")
    arith = kind == "arith"
    if arith and template == DEFAULT_TEMPLATE:
        template = ARITH_TEMPLATE
    sol_block = ARITH_SOLUTION_BLOCK if arith else SOLUTION_BLOCK
    ans_block = ARITH_ANSWER_BLOCK if arith else ANSWER_BLOCK
    diag_blocks = ARITH_DIAGNOSTIC_BLOCKS if arith else DIAGNOSTIC_BLOCKS
    has_answer = answer is not None and str(answer).strip()
    privileged = ""
    if context in ("solution_and_type", "solution"):
        if solution and solution.strip():
            privileged = sol_block.format(solution=solution.strip())
        elif has_answer:
            privileged = ans_block.format(answer=str(answer).strip())
    elif context == "answer_and_type" and has_answer:
        privileged = ans_block.format(answer=str(answer).strip())
    show_type = diagnostic and context != "solution"
    try:
        return template.format(
            problem=problem.strip(),
            solution_block=privileged,
            diagnostic_block=diag_blocks[bool(correct)].format(diagnostic=diagnostic) if show_type else "",
        )
    except KeyError as exc:
        raise ValueError(f"the teacher prompt template uses an unknown field {exc}; available: problem, "
                         "solution_block, diagnostic_block") from None


def build_teacher_input(tokenizer, problem: str, solution: str | None, diagnostic: str | None, correct: bool,
                        response_ids: list[int], *, thinking: bool = True,
                        template: str = DEFAULT_TEMPLATE, kind: str = "math",
                        answer: str | None = None, context: str = "solution_and_type") -> TeacherInput:
    """Token ids of the privileged prompt (chat-templated like the student's, except for the
    compact synthetic-task form, kind="arith") + the response. thinking: `teacher.thinking`
    (the teacher's own switch; by default the student's). answer, context: see `privileged_prompt`."""
    content = privileged_prompt(problem, solution, diagnostic, correct, template, kind, answer, context)
    if kind != "arith" and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=thinking)
    else:
        prompt = content
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise ValueError("the teacher prompt tokenised to nothing")
    return TeacherInput(list(prompt_ids) + list(response_ids), len(prompt_ids))
