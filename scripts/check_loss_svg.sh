#!/usr/bin/env sh
# Checks train_tiny_gpt's loss.svg against the loss.csv beside it (CTest: train_tiny_gpt_loss_svg): the SVG is
# well-formed XML (xmllint), draws one train line with a point per step and one held-out line with a dot
# per evaluation, as many as loss.csv has rows with that column filled.
#   scripts/check_loss_svg.sh OUT_DIR
set -eu
dir="$1"
svg="$dir/loss.svg"
csv="$dir/loss.csv"
[ -f "$svg" ] || { echo "check_loss_svg: no $svg" >&2; exit 1; }
xmllint --noout "$svg"
xp() { xmllint --xpath "$1" "$svg"; }
lines=$(xp "count(//*[local-name()='polyline'])")
[ "$lines" = 2 ] || { echo "check_loss_svg: $lines polylines, want 2 (train, held-out)" >&2; exit 1; }
train_rows=$(awk -F, 'NR > 1 && $2 != "" { n++ } END { print n + 0 }' "$csv")
val_rows=$(awk -F, 'NR > 1 && $3 != "" { n++ } END { print n + 0 }' "$csv")
train_pts=$(xp "string((//*[local-name()='polyline'])[1]/@points)" | wc -w)
dots=$(xp "count(//*[local-name()='circle'])")
[ "$train_pts" = "$train_rows" ] || { echo "check_loss_svg: train line has $train_pts points, loss.csv $train_rows train losses" >&2; exit 1; }
[ "$dots" = "$val_rows" ] || { echo "check_loss_svg: $dots held-out dots, loss.csv $val_rows held-out losses" >&2; exit 1; }
for label in "train (each step" "held-out" "step" "cross-entropy loss"; do
  grep -q ">$label" "$svg" || { echo "check_loss_svg: no text '$label' in $svg" >&2; exit 1; }
done
echo "check_loss_svg: $svg well-formed, $train_pts train points and $dots held-out points as in loss.csv"
