"""The analysis report: `analyze` (pipeline), figures re-rendered from results.json, index.html."""

from .pipeline import AnalyzeConfig, analyze

__all__ = ["AnalyzeConfig", "analyze"]
