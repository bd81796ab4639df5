# Sourced by the scripts that run JAX: preloads TCMalloc when it is installed (scripts/setup.sh
# installs Debian's libtcmalloc-minimal4). XLA:CPU allocates each step's temporaries afresh;
# glibc's malloc maps and unmaps the large ones every time (page faults on every step), TCMalloc
# reuses them: the benchmark GPT's bf16 train step 847 against 1185 ms (AVX-512 VM).
# VQGAN_JAX_TCMALLOC=0 keeps glibc's malloc.
if [ "${VQGAN_JAX_TCMALLOC:-1}" != 0 ] && [[ "${LD_PRELOAD:-}" != *tcmalloc* ]]; then
  _tcmalloc="$(bash "$(dirname "${BASH_SOURCE[0]}")/tcmalloc_path.sh")"
  if [ -n "$_tcmalloc" ]; then
    export LD_PRELOAD="$_tcmalloc${LD_PRELOAD:+:$LD_PRELOAD}"
    # Its "large alloc" notice for every allocation over 1 GiB is noise here.
    export TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD="${TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD:-1099511627776}"
  fi
  unset _tcmalloc
fi
