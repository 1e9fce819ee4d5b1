"""Stage 9, report: ``OUT/report.html``, one self-contained page from what the stages wrote (``html``).

Import rule: ``pipeline.report`` imports only ``pipeline.core`` (it reads the output directory's files).
"""
