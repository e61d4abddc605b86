#!/usr/bin/env bash
# Installs the build into a staging prefix and compiles examples/hello.c
# against it twice, through pkg-config: once with the shared library, once
# statically. Proves the installed header, libraries and qkv.pc work.
set -euo pipefail
build=${1:-build}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cmake --install "$build" --prefix "$stage" >/dev/null
for f in bin/qkv include/qkv.h lib/libqkv.a lib/libqkv.so lib/pkgconfig/qkv.pc; do
  [ -e "$stage/$f" ] || { echo "install check: $f missing"; exit 1; }
done
# the .pc file holds the configured prefix; point pkg-config at the stage
export PKG_CONFIG_PATH="$stage/lib/pkgconfig"
flags="--define-variable=prefix=$stage"
cc examples/hello.c $(pkg-config $flags --cflags --libs qkv) -lm -Wl,-rpath,"$stage/lib" \
   -o "$stage/hello_shared"
cc examples/hello.c $(pkg-config $flags --cflags qkv) "$stage/lib/libqkv.a" \
   $(pkg-config $flags --libs-only-other --static qkv) -lpthread -lm -o "$stage/hello_static"
"$stage/hello_shared"
"$stage/hello_static"
"$stage/bin/qkv" --help >/dev/null
echo "install check: ok (bin/qkv, include/qkv.h, libqkv.a, libqkv.so, qkv.pc)"
