#!/usr/bin/env bash
# Prints the path of the installed TCMalloc (Debian's libtcmalloc-minimal4), or nothing.
# Used by scripts/setup.sh (install it?) and scripts/malloc.sh (preload it). A machine without
# ldconfig prints nothing and succeeds (the status is awk's).
{ ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } \
  | awk '$1 == "libtcmalloc_minimal.so.4" {print $NF; exit}'
