# The image every node of a `ray up` cluster runs (cluster/ray/*.yaml reference it).
#   docker build -t ghcr.io/ziggurat-serving/ziggurat:0.1.0-cuda12.8 .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12=3.12.* python3.12-venv=3.12.* openssh-client=1:9.* \
       rsync=3.* ca-certificates=2024* \
    && rm -rf /var/lib/apt/lists/*

RUN python3.12 -m venv /opt/ziggurat
ENV PATH=/opt/ziggurat/bin:$PATH

# torch's CUDA 12.8 build first, then ziggurat and its dependencies (ray[default], triton, ...).
RUN pip install --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0
COPY . /opt/src/ziggurat
RUN pip install "/opt/src/ziggurat[gpu,postgres]"

RUN useradd --create-home --uid 1000 ray
USER ray
WORKDIR /home/ray

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import ziggurat" || exit 1
CMD ["ziggurat", "--help"]
