# pgseal in a container: `docker build -t pgseal .` then
#   docker run -p 6432:6432 -v $PWD/pgseal.yaml:/etc/pgseal/pgseal.yaml \
#     -e PGSEAL_HSM_PIN=... pgseal serve --config /etc/pgseal/pgseal.yaml
# (set `listen: "0.0.0.0:6432"` in the config). SoftHSM2 is included as the embedded default
# HSM; mount its token folder (hsm.softhsm_dir) on a volume so the master key survives.

# The wheel, with the data path's hot modules compiled by mypyc (setup.py): needs a C compiler,
# which the image that runs it does not.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
RUN PGSEAL_REQUIRE_COMPILED=1 pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends softhsm2 postgresql-client \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/pgseal --create-home pgseal

WORKDIR /opt/pgseal
COPY policies ./policies
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir /tmp/wheels/*.whl && rm -rf /tmp/wheels

USER pgseal
WORKDIR /var/lib/pgseal
EXPOSE 6432 9187
ENTRYPOINT ["pgseal"]
CMD ["serve", "--config", "/etc/pgseal/pgseal.yaml"]
