#!/usr/bin/env bash
# Fetch the project's Kafka broker jars (pom.xml) into deploy/kafka/libs; idempotent via libs/.complete.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
libs="$here/libs"
marker="$libs/.complete"

count_jars() { find "$libs" -maxdepth 1 -name '*.jar' 2>/dev/null | wc -l; }

if [[ -f "$marker" ]]; then
  echo "kafka jars already present: $(count_jars) jars in $libs"
  exit 0
fi

if ! command -v mvn >/dev/null 2>&1; then
  echo "fetch.sh: mvn (Apache Maven) is not installed or not on PATH; it is needed once to fetch the broker jars" >&2
  exit 127
fi

# -q still emits bare ANSI reset codes with some Maven builds; keep the output and show it (cleaned) only on failure.
if ! out="$(mvn -q -B -f "$here/pom.xml" package 2>&1)"; then
  printf '%s\n' "$out" | sed -e 's/\x1b\[[0-9;]*m//g' | grep -v '^[[:space:]]*$' >&2 || true
  echo "fetch.sh: mvn failed to fetch the broker jars" >&2
  exit 1
fi

n="$(count_jars)"
if [[ "$n" -lt 1 ]]; then
  echo "fetch.sh: mvn finished but no jars were copied into $libs" >&2
  exit 1
fi
touch "$marker"
echo "fetched kafka jars: $n jars into $libs"
