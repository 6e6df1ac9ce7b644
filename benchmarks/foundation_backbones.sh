#!/usr/bin/env bash
# Issue 20's backbones for benchmarks/foundation_adapt.py, seed 0 at 64 px (the reduced, 2-core version):
#   chain A: the foundation upstream (configs/foundation.yaml), the targets' frozen splits, and SimCLR + MICLe
#            on the train images of every site (docs/cluster.md's recipe);
#   chain B: each target's own kit on the same upstream schedule (400 steps of 64), then SimCLR + MICLe on
#            that kit's train images: today's single-domain REMEDIS backbones (dermoscopy also in grey).
# The two chains run side by side, one thread each. Rerunning reuses every finished stage.
#   bash benchmarks/foundation_backbones.sh runs/ev20 [simclr_epochs]
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:?output folder, e.g. runs/ev20}
EPOCHS=${2:-2}
S=../shared/data
REMEDIS=${REMEDIS:-.venv/bin/remedis}
T=(--set runtime.threads=1 --quiet)
mkdir -p "$R/targets"
chain_a() {
  $REMEDIS pretrain supervised --config configs/foundation.yaml -o "$R/foundation" "${T[@]}"
  $REMEDIS data split $S/breast-ultrasound/manifest.csv --config configs/breast_ultrasound.yaml --site BUSI -o "$R/targets/busi.csv"
  $REMEDIS data split $S/chest-xray/manifest.csv --config configs/chest_xray.yaml --site NIH -o "$R/targets/nih.csv"
  $REMEDIS data split $S/dermoscopy/manifest.csv --config configs/dermoscopy.yaml --site rosendahl -o "$R/targets/rosendahl.csv"
  $REMEDIS data merge "$R"/foundation/prepared/supervised-*/manifest.csv "$R"/targets/*.csv -o "$R/simclr.csv"
  $REMEDIS pretrain simclr "$R/simclr.csv" --init "$R/foundation" -o "$R/foundation" --config configs/foundation.yaml \
      --set pretrain.simclr.epochs="$EPOCHS" "${T[@]}"
}
kit() {  # folder manifest config upstream-site simclr-sites [--set ...]
  local P=(--set data.image_size=64 --set pretrain.supervised.epochs=8 --set pretrain.supervised.max_steps_per_epoch=50 "${@:6}")
  $REMEDIS pretrain supervised "$2" --config "$3" --site "$4" -o "$R/$1" "${P[@]}" "${T[@]}"
  $REMEDIS pretrain simclr "$2" --config "$3" --site "$5" --init "$R/$1" -o "$R/$1" "${P[@]}" \
      --set pretrain.simclr.epochs="$EPOCHS" "${T[@]}"
}
chain_b() {
  kit bus $S/breast-ultrasound/manifest.csv configs/breast_ultrasound.yaml BUS-BRA BUS-BRA,BUSI
  kit cxr $S/chest-xray/manifest.csv configs/chest_xray.yaml GUANGZHOU-28px GUANGZHOU-28px,NIH
  kit derm $S/dermoscopy/manifest.csv configs/dermoscopy.yaml vidir_modern rosendahl,vidir_modern,vidir_molemax,vienna_dias
  # issue 18's colour-against-grey table: the same dermoscopy backbones decoded as luminance
  kit derm-grey $S/dermoscopy/manifest.csv configs/dermoscopy.yaml vidir_modern rosendahl,vidir_modern,vidir_molemax,vienna_dias \
      --set data.channels=1
}
chain_a > "$R/chain_a.log" 2>&1 & a=$!
chain_b > "$R/chain_b.log" 2>&1 & b=$!
wait $a || { echo "chain A failed: $R/chain_a.log"; exit 1; }
wait $b || { echo "chain B failed: $R/chain_b.log"; exit 1; }
echo "backbones in $R"
