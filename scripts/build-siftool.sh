#!/bin/sh
# Build the Go reference siftool (sylabs/sif from Debian's golang-github-sylabs-sif-dev)
# into $1 (default: <repo>/.tools/siftool). Idempotent: does nothing if it already exists.
# Recipe: ../shared/spec/test-stack.md. Needs golang-go + golang-github-sylabs-sif-dev.
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$REPO/.tools/siftool}
SRC=/usr/share/gocode/src/github.com/sylabs/sif
[ -x "$OUT" ] && exit 0
command -v go >/dev/null || { echo "build-siftool: 'go' not found (apt-get install golang-go)" >&2; exit 1; }
[ -d "$SRC" ] || { echo "build-siftool: $SRC missing (apt-get install golang-github-sylabs-sif-dev)" >&2; exit 1; }
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
mkdir -p "$W/src/github.com/sylabs/sif" "$W/src/siftoolmain" "$(dirname "$OUT")"
ln -s "$SRC" "$W/src/github.com/sylabs/sif/v2"
cat > "$W/src/siftoolmain/main.go" <<'GO'
package main

import (
	"os"

	"github.com/spf13/cobra"
	"github.com/sylabs/sif/v2/pkg/siftool"
)

func main() {
	root := &cobra.Command{Use: "siftool"}
	if err := siftool.AddCommands(root, siftool.OptWithExperimental(true)); err != nil {
		os.Exit(2)
	}
	if err := root.Execute(); err != nil {
		os.Exit(1)
	}
}
GO
cd "$W/src/siftoolmain"
GO111MODULE=off GOPATH="$W:/usr/share/gocode" GOCACHE="$W/cache" go build -o "$W/siftool" .
# rename into place so a concurrent caller never sees a half-written binary
mv "$W/siftool" "$OUT.tmp.$$" && mv "$OUT.tmp.$$" "$OUT"
