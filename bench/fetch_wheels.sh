#!/usr/bin/env bash
# Fills the git-ignored .whl/ with what the GPU machine lacks (it reaches no package registry), for
# bench/gpu_session.sh to install there: grain and its needs plus the digits for training in .whl/,
# tokamax and its needs for the kernel benchmark in .whl/tokamax/, the HTTP server's packages (the
# versions tested here) for the soak in .whl/server/. Run here, with a venv that has
# scikit-learn (bash scripts/test.sh makes one): PYTHON=.venv/bin/python bash bench/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
download() {        # cp312 manylinux x86-64 wheels of exactly the named versions, no dependencies
    local dir=$1; shift
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" "$@"
}
download .whl grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
download .whl/tokamax tokamax==0.0.17 einshape==1.0 fire==0.7.1 immutabledict==4.3.1 jaxtyping==0.3.11 \
    wadler-lindig==0.1.8 qwix==0.1.8 six==1.17.0 termcolor==3.3.0 xprof==2.24.2 protobuf==7.36.2 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 cloudpickle==3.1.3
download .whl/server fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 h11==0.16.0 click==8.5.1 anyio==4.16.0 \
    sniffio==1.3.1 prometheus-client==0.26.0 httpx==0.29.0 httpcore==1.0.9 idna==3.21 certifi==2026.10.19.post1 \
    annotated-doc==0.0.7 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0
"$PYTHON" -c "from train.tasks import export_digits; export_digits('.whl/digits.npz')"
ls -R .whl
