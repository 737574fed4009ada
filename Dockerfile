# geoprime training image: CUDA-enabled PyTorch matching pyproject's torch pin, our pinned
# dependencies, the package (in /opt/geoprime; editable install: Hydra finds configs/ beside it),
# a non-root user (uid 1000) working in /workspace, where data/ and outputs/ are writable or
# mounted. Build: docker build -t geoprime:0.1.0 .   Run lines: README.md, "The Docker image".
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

# Compiler caches under /tmp: writable whatever uid runs the container (docker run --user).
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_EXTENSIONS_DIR=/tmp/geoprime-cache/torch_extensions \
    TRITON_CACHE_DIR=/tmp/geoprime-cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/geoprime-cache/inductor \
    MPLCONFIGDIR=/tmp/geoprime-cache/matplotlib \
    MPLBACKEND=Agg \
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

WORKDIR /opt/geoprime

# A C/C++ compiler: Triton (the fused depth loss on GPUs) builds its launcher stubs with one at run
# time, inductor's CPU code (the compiled CPU loss) needs one, and DeepSpeed JIT-builds its ops;
# the runtime base image has none (Triton then fails: "Failed to find C compiler"). The base
# image's Ubuntu release decides the versions, hence no apt pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ \
    && rm -rf /var/lib/apt/lists/*

# Dependencies first (their own layer, rebuilt only when the pins change). Keep this list
# equal to pyproject.toml's [project.dependencies]: tests/test_dockerfile.py checks it.
RUN python -m pip install \
    "torch==2.14.1" \
    "torchvision==0.29.1" \
    "deepspeed==0.19.8" \
    "webdataset==1.0.2" \
    "hydra-core==1.3.8" \
    "mlflow==3.17.2" \
    "nvidia-ml-py==13.615.71" \
    "numpy==2.4.6" \
    "pillow==13.0.0" \
    "tqdm==4.70.1" \
    "matplotlib==3.11.2" \
    "boto3==1.44.8" \
    "h5py==3.16.0" \
    "pyyaml==6.0.4" \
    "requests==2.34.2" \
    "scipy==1.17.1"

COPY pyproject.toml README.md ./
COPY trainer ./trainer
COPY data_shards ./data_shards
COPY launch ./launch
COPY configs ./configs
COPY docker/entrypoint.sh /usr/local/bin/geoprime-entrypoint
# /workspace: the working folder of every run (relative paths: data/..., outputs/...), owned by
# uid 1000; mount the shards at /workspace/data and keep the outputs at /workspace/outputs.
RUN python -m pip install --no-deps --editable . \
    && useradd --create-home --uid 1000 --user-group geoprime \
    && chmod 0755 /usr/local/bin/geoprime-entrypoint \
    && mkdir -p /workspace/data /workspace/outputs \
    && chown -R 1000:1000 /workspace

WORKDIR /workspace
USER 1000:1000
ENTRYPOINT ["/usr/local/bin/geoprime-entrypoint"]
CMD ["--help"]
