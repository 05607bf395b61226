#!/usr/bin/env bash
# Install what the benchmarks need (Debian packages). The tool and its tests need none of it.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
  nginx-light wrk curl openssh-server openssh-client procps valgrind haproxy
echo "bench tools ready: $(nginx -v 2>&1), $(wrk -v 2>&1 | head -1), $(ssh -V 2>&1), $(valgrind --version), $(haproxy -v | head -1)"
