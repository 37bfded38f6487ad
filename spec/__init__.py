"""loom.spec: the user's language (pydantic models, presets, GPU catalog, validation) and its compiled form."""
from .errors import SpecError, SpecIssue
from .gpus import CATALOG, GPU, lookup as lookup_gpu
from .hf_config import model_from_hf_config
from .load import load_spec, parse_spec, spec_from_dict
from .model import ModelSpec
from .presets import PRESETS
from .spec import ClusterSpec, CustomGPU, ParallelSpec, Spec, TrainingSpec
from .mesh import Mesh
from .plan import Op, OpKind, Plan
from .compile import compile_plan
from .schedules import Action, ScheduleError, build_schedule, validate_schedule

__all__ = ["SpecError", "SpecIssue", "CATALOG", "GPU", "lookup_gpu", "model_from_hf_config", "load_spec",
           "parse_spec", "spec_from_dict", "ModelSpec", "PRESETS", "ClusterSpec", "CustomGPU", "ParallelSpec",
           "Spec", "TrainingSpec", "Mesh", "Op", "OpKind", "Plan", "compile_plan", "Action",
           "ScheduleError", "build_schedule", "validate_schedule"]
