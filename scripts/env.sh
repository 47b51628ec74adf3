# Sourced by the scripts that build Carina: tools installed by scripts/setup.sh go on PATH.
if ! command -v cmake >/dev/null 2>&1 && [ -x .deps/cmake/bin/cmake ]; then
  export PATH="$PWD/.deps/cmake/bin:$PATH"
fi
