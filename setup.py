"""Build the batchgate._native extension against the system libcurl and cJSON.

Flags come from pkg-config (curl-config as a fallback for libcurl). Overrides:
  BATCHGATE_CFLAGS / BATCHGATE_LDFLAGS   extra compiler / linker flags
  BATCHGATE_WERROR=1                     warnings are errors (CI builds)
  BATCHGATE_DEBUG=1                      -O0 -g, asserts on
  BATCHGATE_SANITIZE=address             AddressSanitizer + UndefinedBehaviorSanitizer
                                         (load libasan first: LD_PRELOAD=$(cc
                                         -print-file-name=libasan.so), see tests/run_all.sh)
  PKG_CONFIG                             the pkg-config program to use
"""
import glob
import os
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))

INSTALL_HINT = (
    "batchgate needs the development files of libcurl and cJSON, found with pkg-config.\n"
    "On Debian/Ubuntu: apt-get install libcurl4-openssl-dev libcjson-dev pkg-config\n"
    "On Fedora: dnf install libcurl-devel cjson-devel pkgconf-pkg-config"
)


def _run(cmd):
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return shlex.split(out.stdout)


def _pkg(name, fallback=None):
    """Return (cflags, libs) for a library, or exit with an install hint."""
    pkg_config = os.environ.get("PKG_CONFIG", "pkg-config")
    if shutil.which(pkg_config):
        cflags = _run([pkg_config, "--cflags", name])
        libs = _run([pkg_config, "--libs", name])
        if cflags is not None and libs is not None:
            return cflags, libs
    if fallback and shutil.which(fallback[0]):
        cflags = _run([fallback[0], "--cflags"])
        libs = _run([fallback[0], "--libs"])
        if cflags is not None and libs is not None:
            return cflags, libs
    sys.exit(f"error: could not find {name} (pkg-config module '{name}').\n{INSTALL_HINT}")


def _extension():
    curl_cflags, curl_libs = _pkg("libcurl", fallback=["curl-config"])
    cjson_cflags, cjson_libs = _pkg("libcjson")
    cflags = ["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Wshadow",
              "-Wstrict-prototypes", "-fvisibility=hidden", "-Icsrc/core"]
    if os.environ.get("BATCHGATE_WERROR") == "1":
        cflags.append("-Werror")
    if os.environ.get("BATCHGATE_DEBUG") == "1":
        cflags += ["-O0", "-g", "-UNDEBUG"]
    san = []
    sanitize = os.environ.get("BATCHGATE_SANITIZE", "")
    if sanitize == "address":
        # UB aborts too (no recovery), so a test run cannot pass over it.
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
               "-fno-omit-frame-pointer", "-g", "-O1"]
    elif sanitize:
        sys.exit(f"error: BATCHGATE_SANITIZE={sanitize!r}: only 'address' is supported")
    cflags += san + curl_cflags + cjson_cflags + shlex.split(
        os.environ.get("BATCHGATE_CFLAGS", ""))
    ldflags = san + curl_libs + cjson_libs + ["-lpthread"] + shlex.split(
        os.environ.get("BATCHGATE_LDFLAGS", ""))
    sources = sorted(glob.glob("csrc/core/*.c")) + sorted(glob.glob("csrc/binding/*.c"))
    depends = sorted(glob.glob("csrc/core/*.h")) + sorted(glob.glob("csrc/binding/*.h"))
    return Extension(
        "batchgate._native",
        sources=sources,
        depends=depends,
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )


os.chdir(HERE)
_sanitize = os.environ.get("BATCHGATE_SANITIZE", "")
# A sanitized build keeps its own objects: setuptools would otherwise reuse the
# plain objects of an earlier build in build/ and silently skip the sanitizer.
setup(ext_modules=[_extension()],
      options={"build": {"build_base": os.path.join("build", "sanitize-" + _sanitize)}}
      if _sanitize else {})
