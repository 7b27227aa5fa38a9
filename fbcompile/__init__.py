"""fbcompile: compile PyTorch models into feedback-trainable programs.

``compile(model, example_inputs)`` traces the model with torch.fx and derives its feedback graph;
``verify(program, inputs)`` measures the Jacobian matching losses of every node;
``learner(program, algorithm)`` trains it by target or error propagation.
"""
from .errors import FBCompileError
from .registry import register_rule
from .ops import declare_op
from .compiler import compile, coverage
from .program import FeedbackProgram
from .verify import VerifyReport, verify
from .runtime import learner, register_algorithm
from . import rules  # noqa: F401  (registers the rule library)
from .recommended import recommended

__all__ = ["compile", "coverage", "verify", "VerifyReport", "FeedbackProgram", "FBCompileError", "register_rule",
           "declare_op", "learner", "register_algorithm", "recommended"]
__version__ = "0.1.0"
