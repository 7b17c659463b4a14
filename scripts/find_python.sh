# Source this: defines find_python, which prints the path of a Python >= 3.12 ($PYTHON first, then
# PATH, then pyenv's and the usual install folders) or fails with a message.

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }

find_python() {
    local c
    for c in "${PYTHON:-}" python3.13 python3.12 python3 python \
             "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3 /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do
        [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && python_ok "$c" && { command -v "$c"; return; }
    done
    echo "error: no Python >= 3.12 found; install one or set PYTHON=/path/to/python3.12" >&2
    return 1
}
