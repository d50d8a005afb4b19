"""Segmentation, annotators (api / self / oracle) and spans -> token routes."""

from .base import (
    ERROR_TYPES,
    FAILURE_KINDS,
    KEY_TYPES,
    Annotation,
    AnnotationRequest,
    Annotator,
    FailureCounter,
)
from .segment import Segment, segment_text
from .spans import CoverageExceeded, annotation_to_mask, segments_to_token_mask

__all__ = [
    "ERROR_TYPES",
    "FAILURE_KINDS",
    "KEY_TYPES",
    "Annotation",
    "AnnotationRequest",
    "Annotator",
    "CoverageExceeded",
    "FailureCounter",
    "Segment",
    "annotation_to_mask",
    "segment_text",
    "segments_to_token_mask",
]
