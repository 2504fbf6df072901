"""Model bundles and their runners.

Kept import-light on purpose: `bundle` must load without onnxruntime or torch so that the cached path of
`prepare` stays fast; import `sieve_core.models.bi_encoder` explicitly where a runner is needed.
"""
