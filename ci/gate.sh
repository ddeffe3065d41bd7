#!/usr/bin/env bash
# The gate step of the model-audit GitHub Action (action.yml), usable from any CI: runs
# `model-audit gate` with the inputs below, writes the Markdown summary to
# $GITHUB_STEP_SUMMARY (when set), the report and JUnit XML under the output directory, and
# `exit-code=N` to $GITHUB_OUTPUT (when set); exits with the gate's code (0 pass, 1 a check
# failed, 2 bad input, 3 nothing audited).
#
#   MODEL_AUDIT_CHECKPOINT  the checkpoint to gate (required)
#   MODEL_AUDIT_PROBE       the probe set (required)
#   MODEL_AUDIT_POLICY      the policy file [default: model-audit-policy.toml]
#   MODEL_AUDIT_BASELINE    the previous release's audit.json (optional)
#   MODEL_AUDIT_SANITY      a sanity.json of this checkpoint and probe (optional)
#   MODEL_AUDIT_OUT         the output directory [default: gate-report]
#   MODEL_AUDIT_ARGS        further options, e.g. "--arch resnet18-cifar --normalize cifar10"
#   MODEL_AUDIT_BIN         the command [default: model-audit]
set -uo pipefail

: "${MODEL_AUDIT_CHECKPOINT:?set MODEL_AUDIT_CHECKPOINT to the checkpoint to gate}"
: "${MODEL_AUDIT_PROBE:?set MODEL_AUDIT_PROBE to the probe set}"
policy="${MODEL_AUDIT_POLICY:-model-audit-policy.toml}"
out="${MODEL_AUDIT_OUT:-gate-report}"
bin="${MODEL_AUDIT_BIN:-model-audit}"

args=(gate "$MODEL_AUDIT_CHECKPOINT" --probe "$MODEL_AUDIT_PROBE" --policy "$policy"
      --out "$out" --junit "$out/junit.xml" --summary "$out/summary.md" --quiet)
if [ -n "${MODEL_AUDIT_BASELINE:-}" ]; then args+=(--baseline "$MODEL_AUDIT_BASELINE"); fi
if [ -n "${MODEL_AUDIT_SANITY:-}" ]; then args+=(--sanity "$MODEL_AUDIT_SANITY"); fi
# shellcheck disable=SC2206  # MODEL_AUDIT_ARGS is a list of options, split on spaces
if [ -n "${MODEL_AUDIT_ARGS:-}" ]; then args+=($MODEL_AUDIT_ARGS); fi

mkdir -p "$out"
"$bin" "${args[@]}"
code=$?

if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then
  if [ -s "$out/summary.md" ]; then
    cat "$out/summary.md" >> "$GITHUB_STEP_SUMMARY"
  else
    printf '## model-audit gate: no verdict (exit %s)\n\nThe gate stopped before it could judge the checkpoint; its log says why.\n' "$code" >> "$GITHUB_STEP_SUMMARY"
  fi
fi
if [ -n "${GITHUB_OUTPUT:-}" ]; then
  echo "exit-code=$code" >> "$GITHUB_OUTPUT"
fi
exit "$code"
