#!/usr/bin/env bash
# Installs Debian's `slurm-wlm` and `munge` when their binaries are missing, for the real-Slurm
# end-to-end test (tests/e2e/test_slurm_cluster.py), which runs a one-node cluster of its own.
# Non-interactive and quiet; a no-op when they are present. Where nothing can be installed (no
# apt-get, not root and no password-less sudo), it says so and exits 0: the test then skips with
# the reason. .ci/run calls it before `make test`.
set -uo pipefail

need=()
for bin in slurmctld slurmd sbatch munged; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need+=("$bin")
done
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "[install_slurm] missing: ${need[*]}; installing slurm-wlm and munge"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[install_slurm] no apt-get here: not installed (the real-Slurm test will skip)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "[install_slurm] not root and no password-less sudo: not installed (the real-Slurm test will skip)"
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
install() {
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold slurm-wlm munge >/dev/null
}
if ! install 2>/dev/null; then
  $SUDO apt-get update -q >/dev/null || true
  if ! install; then
    echo "[install_slurm] apt-get install slurm-wlm munge failed (the real-Slurm test will skip)"
    exit 0
  fi
fi
# The packages' own services are not used (the test starts its daemons with its own config).
echo "[install_slurm] installed: $(dpkg-query -W -f "\${Package} \${Version}  " slurm-wlm munge 2>/dev/null)"
