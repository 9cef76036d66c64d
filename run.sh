#!/usr/bin/env bash
# Paper recipes for l2l.py, one per table row, with the paper's hyperparameters.
#   bash run.sh list              the recipes and the row each reproduces
#   bash run.sh NAME [flags...]   run one; extra flags are passed on (e.g. --data-dir, --device, --epochs)
#   bash run.sh report [RUN...]   python l2l.py --report: one markdown table of the runs (default: runs/*),
#                                 the paper's numbers beside the measured ones, and each run's curves.svg
#   bash run.sh repro-fast [flags...]  the fast-AT family on CIFAR-10 in full (one recipe per row, in order):
#                                 Fast-AT 15 epochs, then Fast-BAT, Fast-AT and Fast-AT-GA at eps 8/255, then 16/255,
#                                 then PGD-2-AT; each evaluated with PGD-50-10 (step eps/4) and AutoAttack on
#                                 the full test set, written to runs/NAME; bash run.sh report runs/... tabulates them
#   bash run.sh bench [flags...]  python l2l.py --benchmark for every method: CIFAR-10, PreActResNet-18,
#                                 batch 128; add e.g. --precision bf16 --channels-last --compile, --batch-size 512
# Each recipe writes to runs/NAME unless --out is given, and records its name and the paper's numbers (the
# table's last field: clean, an attack, aa = the paper's AutoAttack column) for the report. Every recipe ends with
# AutoAttack's standard version (aa) beside the paper's own attacks: robust accuracy is only as good as the attack.
# PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")"

# name | what it reproduces | flags for l2l.py (defaults not repeated: see python l2l.py --help) | paper's numbers
RECIPES=$(cat <<'TABLE'
quick-mnist      | A first result in 3 minutes on 2 CPU cores: PGD-2-AT, SmallCNN, 4 epochs on 10000 MNIST images, cyclic lr 0.1 (measured 98.2% clean, 86.4% FGSM, 68.6% PGD-40 on 500 test images in 174 s; README) | --method pgd-at --dataset mnist --steps 2 --step-size 0.15 --lr-schedule cyclic --lr 0.1 --epochs 4 --train-size 10000 --val-size 500 --val-steps 5 --test-size 500 --eval-attacks fgsm,pgd |
pgd-at-mnist     | Madry et al. 2018 MNIST setting (eps 0.3, PGD-40 step 0.01) on TRADES' SmallCNN, 100 epochs | --method pgd-at --dataset mnist | 
trades-mnist     | TRADES (Zhang et al. 2019) MNIST: SmallCNN, eps 0.3, 40 steps of 0.01, beta 1 = the MNIST script's default (README: 99.48 / 96.07 under a 40-step attack) | --method trades --dataset mnist --beta 1 | clean=99.48,pgd=96.07
pgd-at-cifar10   | PGD-10-AT (Madry et al.) with Rice et al.'s PreActResNet-18 200-epoch schedule; Fast-BAT's PGD-10 baseline | --method pgd-at --dataset cifar10 --model preactresnet18 --epochs 200 --lr-milestones 100,150 | 
pgd-at-wrn-cifar10 | Madry et al. CIFAR-10 PGD-AT (87.30 / 45.80 as quoted by Fast-AT), WRN-34-10, PGD-10 step 2/255 | --method pgd-at --dataset cifar10 --model wrn --depth 34 --width 10 --weight-decay 2e-4 | clean=87.30,pgd=45.80
trades-cifar10   | TRADES CIFAR-10, WRN-34-10, beta 6, 10 steps of 0.007, eps 0.031 (README 84.92 / 56.61 PGD-20) | --method trades --dataset cifar10 --model wrn --eps 0.031 --beta 6 --eval-step-size 0.003 | clean=84.92,pgd=56.61
fast-at-cifar10  | Fast-AT (Wong et al. 2020), PreActResNet-18, 15 epochs cyclic 0.2, FGSM-RS step 10/255 (README 86.06 / 46.06, PGD-50-10) | --method fast-at --dataset cifar10 --epochs 15 --eval-attacks fgsm,pgd,cw,aa --eval-steps 50 --eval-restarts 10 --eval-step-size 2/255 | clean=86.06,pgd=46.06
plain-cifar10    | Standard training baseline, PreActResNet-18, 200 epochs (Fast-BAT: PGD-0) | --method plain --dataset cifar10 --eval-steps 20 | 
l2l-plain-cifar10  | L2L poster, CIFAR-10 "Plain" (95.22 clean / 0.00 PGM / 0.00 CW), WRN-34-10, the L2L schedule | --method plain --dataset cifar10 L2L_CIFAR --eval-attacks fgsm,pgd,cw-linf,aa | clean=95.22,pgd=0.00,cw-linf=0.00
l2l-pgm-cifar10    | L2L poster, CIFAR-10 "PGM net" (87.30 / 47.04); PGD-10 step 0.003 from x + 0.001 N(0, I), BN eval, as adv_loss_pgd (its mixed clean+adv loss is not reproduced) | --method pgd-at --dataset cifar10 --steps 10 --step-size 0.003 --attack-bn eval --attack-start normal L2L_CIFAR --eval-attacks fgsm,pgd,cw-linf,aa | clean=87.30,pgd=47.04
l2l-naive-cifar10  | L2L poster, CIFAR-10 "Naive L2L" (94.53 / 0.01 / 0) | --method l2l-naive --dataset cifar10 L2L_CIFAR --eval-attacks fgsm,pgd,cw-linf,l2l,aa | clean=94.53,pgd=0.01,cw-linf=0.00
l2l-grad-cifar10   | L2L poster, CIFAR-10 "Grad L2L" (85.84 / 51.17 / 53.5) | --method l2l-grad --dataset cifar10 L2L_CIFAR --eval-attacks fgsm,pgd,cw-linf,l2l,aa | clean=85.84,pgd=51.17,cw-linf=53.50
l2l-2step-cifar10  | L2L poster, CIFAR-10 "2-Step L2L" (85.35 / 54.32 / 57.07) | --method l2l-2step --dataset cifar10 L2L_CIFAR --eval-attacks fgsm,pgd,cw-linf,l2l,aa | clean=85.35,pgd=54.32,cw-linf=57.07
l2l-plain-cifar100 | L2L poster, CIFAR-100 "Plain" (76.10 / 0.13 / 0.00) | --method plain --dataset cifar100 L2L_CIFAR --eval-attacks fgsm,pgd,cw-linf,aa | clean=76.10,pgd=0.13,cw-linf=0.00
l2l-pgm-cifar100   | L2L poster, CIFAR-100 "PGM net" (62.68 / 23.75 / 25.95) | --method pgd-at --dataset cifar100 --steps 10 --step-size 0.003 --attack-bn eval --attack-start normal L2L_CIFAR --eval-attacks fgsm,pgd,cw-linf,aa | clean=62.68,pgd=23.75,cw-linf=25.95
l2l-naive-cifar100 | L2L poster, CIFAR-100 naive L2L (no number in the poster) | --method l2l-naive --dataset cifar100 L2L_CIFAR --eval-attacks fgsm,pgd,cw-linf,l2l,aa | 
l2l-grad-cifar100  | L2L poster, CIFAR-100 "Grad L2L" (62.18 / 28.67 / 29.65) | --method l2l-grad --dataset cifar100 L2L_CIFAR --eval-attacks fgsm,pgd,cw-linf,l2l,aa | clean=62.18,pgd=28.67,cw-linf=29.65
l2l-2step-cifar100 | L2L poster, CIFAR-100 "2-Step L2L" (60.95 / 31.03 / 32.28) | --method l2l-2step --dataset cifar100 L2L_CIFAR --eval-attacks fgsm,pgd,cw-linf,l2l,aa | clean=60.95,pgd=31.03,cw-linf=32.28
fastbat-fast-at-cifar10-eps8   | Fast-BAT Table 1 (arXiv v1), Fast-AT, eps 8/255: 45.47 RA-PGD / 41.97 RA-AA / 81.72 SA | --method fast-at --dataset cifar10 --eps 8/255 FASTBAT --val-step-size 2/255 | clean=81.72,pgd=45.47,aa=41.97
fastbat-fast-at-ga-cifar10-eps8 | Fast-BAT Table 1 (arXiv v1), Fast-AT-GA, eps 8/255: 47.43 / 43.52 / 79.84 | --method fast-at-ga --dataset cifar10 --eps 8/255 FASTBAT --val-step-size 2/255 | clean=79.84,pgd=47.43,aa=43.52
fastbat-fast-bat-cifar10-eps8  | Fast-BAT Table 1 (arXiv v1), Fast-BAT, eps 8/255: 48.74 / 44.89 / 79.43 | --method fast-bat --dataset cifar10 --eps 8/255 FASTBAT --val-step-size 2/255 | clean=79.43,pgd=48.74,aa=44.89
fastbat-pgd2-cifar10-eps8      | PGD-2-AT (2 steps of eps/2, random start) baseline of Fast-BAT, cifar10, eps 8/255 (no number read) | --method pgd-at --steps 2 --step-size 4/255 --dataset cifar10 --eps 8/255 FASTBAT --val-step-size 2/255 | 
fastbat-fast-at-cifar10-eps16  | Fast-BAT Table 1 (arXiv v1), Fast-AT, eps 16/255: 21.79 / 12.57 / 46.02 | --method fast-at --dataset cifar10 --eps 16/255 FASTBAT --val-step-size 4/255 | clean=46.02,pgd=21.79,aa=12.57
fastbat-fast-at-ga-cifar10-eps16 | Fast-BAT Table 1 (arXiv v1), Fast-AT-GA, eps 16/255: 26.22 / 18.03 / 58.57 | --method fast-at-ga --dataset cifar10 --eps 16/255 FASTBAT --val-step-size 4/255 | clean=58.57,pgd=26.22,aa=18.03
fastbat-fast-bat-cifar10-eps16 | Fast-BAT Table 1 (arXiv v1), Fast-BAT, eps 16/255: 26.15 / 18.21 / 67.79 | --method fast-bat --dataset cifar10 --eps 16/255 FASTBAT --val-step-size 4/255 | clean=67.79,pgd=26.15,aa=18.21
fastbat-pgd2-cifar10-eps16     | PGD-2-AT (2 steps of eps/2, random start) baseline of Fast-BAT, cifar10, eps 16/255 (no number read) | --method pgd-at --steps 2 --step-size 8/255 --dataset cifar10 --eps 16/255 FASTBAT --val-step-size 4/255 | 
fastbat-fast-at-cifar100-eps8  | Fast-BAT's Fast-AT on cifar100, eps 8/255 (ICML tables not read: no number) | --method fast-at --dataset cifar100 --eps 8/255 FASTBAT --augment crop-flip-rotate --val-step-size 2/255 | 
fastbat-fast-at-ga-cifar100-eps8 | Fast-BAT's Fast-AT-GA on cifar100, eps 8/255 (ICML tables not read: no number) | --method fast-at-ga --dataset cifar100 --eps 8/255 FASTBAT --augment crop-flip-rotate --val-step-size 2/255 | 
fastbat-fast-bat-cifar100-eps8 | Fast-BAT's Fast-BAT on cifar100, eps 8/255 (ICML tables not read: no number) | --method fast-bat --dataset cifar100 --eps 8/255 FASTBAT --augment crop-flip-rotate --val-step-size 2/255 | 
fastbat-pgd2-cifar100-eps8     | PGD-2-AT (2 steps of eps/2, random start) baseline of Fast-BAT, cifar100, eps 8/255 (no number read) | --method pgd-at --steps 2 --step-size 4/255 --dataset cifar100 --eps 8/255 FASTBAT --augment crop-flip-rotate --val-step-size 2/255 | 
fastbat-fast-at-cifar100-eps16 | Fast-BAT's Fast-AT on cifar100, eps 16/255 (ICML tables not read: no number) | --method fast-at --dataset cifar100 --eps 16/255 FASTBAT --augment crop-flip-rotate --val-step-size 4/255 | 
fastbat-fast-at-ga-cifar100-eps16 | Fast-BAT's Fast-AT-GA on cifar100, eps 16/255 (ICML tables not read: no number) | --method fast-at-ga --dataset cifar100 --eps 16/255 FASTBAT --augment crop-flip-rotate --val-step-size 4/255 | 
fastbat-fast-bat-cifar100-eps16 | Fast-BAT's Fast-BAT on cifar100, eps 16/255 (ICML tables not read: no number) | --method fast-bat --dataset cifar100 --eps 16/255 FASTBAT --augment crop-flip-rotate --val-step-size 4/255 | 
fastbat-pgd2-cifar100-eps16    | PGD-2-AT (2 steps of eps/2, random start) baseline of Fast-BAT, cifar100, eps 16/255 (no number read) | --method pgd-at --steps 2 --step-size 8/255 --dataset cifar100 --eps 16/255 FASTBAT --augment crop-flip-rotate --val-step-size 4/255 | 
fastbat-fast-at-svhn-eps8      | Fast-BAT's Fast-AT on svhn, eps 8/255 (ICML tables not read: no number) | --method fast-at --dataset svhn --eps 8/255 FASTBAT --augment none --val-size 7326 --lr 0.05 --val-step-size 2/255 | 
fastbat-fast-at-ga-svhn-eps8   | Fast-BAT's Fast-AT-GA on svhn, eps 8/255 (ICML tables not read: no number) | --method fast-at-ga --dataset svhn --eps 8/255 FASTBAT --augment none --val-size 7326 --lr 0.05 --val-step-size 2/255 | 
fastbat-fast-bat-svhn-eps8     | Fast-BAT's Fast-BAT on svhn, eps 8/255 (ICML tables not read: no number) | --method fast-bat --dataset svhn --eps 8/255 FASTBAT --augment none --val-size 7326 --lr 0.05 --val-step-size 2/255 | 
fastbat-pgd2-svhn-eps8         | PGD-2-AT (2 steps of eps/2, random start) baseline of Fast-BAT, svhn, eps 8/255 (no number read) | --method pgd-at --steps 2 --step-size 4/255 --dataset svhn --eps 8/255 FASTBAT --augment none --val-size 7326 --lr 0.05 --val-step-size 2/255 | 
fastbat-fast-at-svhn-eps16     | Fast-BAT's Fast-AT on svhn, eps 16/255 (ICML tables not read: no number) | --method fast-at --dataset svhn --eps 16/255 FASTBAT --augment none --val-size 7326 --lr 0.05 --val-step-size 4/255 | 
fastbat-fast-at-ga-svhn-eps16  | Fast-BAT's Fast-AT-GA on svhn, eps 16/255 (ICML tables not read: no number) | --method fast-at-ga --dataset svhn --eps 16/255 FASTBAT --augment none --val-size 7326 --lr 0.05 --val-step-size 4/255 | 
fastbat-fast-bat-svhn-eps16    | Fast-BAT's Fast-BAT on svhn, eps 16/255 (ICML tables not read: no number) | --method fast-bat --dataset svhn --eps 16/255 FASTBAT --augment none --val-size 7326 --lr 0.05 --val-step-size 4/255 | 
fastbat-pgd2-svhn-eps16        | PGD-2-AT (2 steps of eps/2, random start) baseline of Fast-BAT, svhn, eps 16/255 (no number read) | --method pgd-at --steps 2 --step-size 8/255 --dataset svhn --eps 16/255 FASTBAT --augment none --val-size 7326 --lr 0.05 --val-step-size 4/255 | 
rnn-t1-pgd-at-mnist            | Xiong & Hsieh Table 1 'AdvTrain' (87.33 robust, dataset not named; MNIST assumed): PGD-40 | --method pgd-at --dataset mnist RNN_MNIST | 
rnn-t1-pgd-at-bls-mnist        | Xiong & Hsieh Table 1 'AdvTrain+BLS' (88.71): PGD-40 with backtracking line search | --method pgd-at-bls --dataset mnist RNN_MNIST | 
rnn-t3-pgd-at-mnist          | Xiong & Hsieh Table 3 (white-box, MNIST, 4-layer CNN), AdvTrain; T = 40 | --method pgd-at --dataset mnist RNN_MNIST --eval-attacks fgsm,pgd,cw,aa | 
rnn-t3-rnn-adv-mnist         | Xiong & Hsieh Table 3 (white-box, MNIST, 4-layer CNN), RNN-Adv; T = 40 | --method rnn-adv --dataset mnist RNN_MNIST --eval-attacks fgsm,pgd,cw,rnn,aa | 
rnn-t3-trades-mnist          | Xiong & Hsieh Table 3 (white-box, MNIST, 4-layer CNN), TRADES; T = 40 | --method trades --dataset mnist RNN_MNIST --eval-attacks fgsm,pgd,cw,aa | 
rnn-t3-rnn-trades-mnist      | Xiong & Hsieh Table 3 (white-box, MNIST, 4-layer CNN), RNN-TRADES; T = 40 | --method rnn-trades --dataset mnist RNN_MNIST --eval-attacks fgsm,pgd,cw,rnn,aa | 
rnn-t4-pgd-at-cifar10        | Xiong & Hsieh Table 4 (white-box, CIFAR-10, VGG-16), AdvTrain; T = 10 | --method pgd-at --dataset cifar10 --model vgg16 RNN_CIFAR --eval-attacks fgsm,pgd,cw,aa | 
rnn-t4-rnn-adv-cifar10       | Xiong & Hsieh Table 4 (white-box, CIFAR-10, VGG-16), RNN-Adv; T = 10 | --method rnn-adv --dataset cifar10 --model vgg16 RNN_CIFAR --eval-attacks fgsm,pgd,cw,rnn,aa | 
rnn-t4-trades-cifar10        | Xiong & Hsieh Table 4 (white-box, CIFAR-10, VGG-16), TRADES; T = 10 | --method trades --dataset cifar10 --model vgg16 RNN_CIFAR --eval-attacks fgsm,pgd,cw,aa | 
rnn-t4-rnn-trades-cifar10    | Xiong & Hsieh Table 4 (white-box, CIFAR-10, VGG-16), RNN-TRADES; T = 10 | --method rnn-trades --dataset cifar10 --model vgg16 RNN_CIFAR --eval-attacks fgsm,pgd,cw,rnn,aa | 
rnn-t5-pgd-at-cifar10        | Xiong & Hsieh Table 5 (white-box, CIFAR-10, WideResNet-34-10), AdvTrain; T = 10 | --method pgd-at --dataset cifar10 --model wrn RNN_CIFAR --eval-attacks fgsm,pgd,cw,aa | 
rnn-t5-rnn-adv-cifar10       | Xiong & Hsieh Table 5 (white-box, CIFAR-10, WideResNet-34-10), RNN-Adv; T = 10 | --method rnn-adv --dataset cifar10 --model wrn RNN_CIFAR --eval-attacks fgsm,pgd,cw,rnn,aa | 
rnn-t5-trades-cifar10        | Xiong & Hsieh Table 5 (white-box, CIFAR-10, WideResNet-34-10), TRADES; T = 10 | --method trades --dataset cifar10 --model wrn RNN_CIFAR --eval-attacks fgsm,pgd,cw,aa | 
rnn-t5-rnn-trades-cifar10    | Xiong & Hsieh Table 5 (white-box, CIFAR-10, WideResNet-34-10), RNN-TRADES; T = 10 | --method rnn-trades --dataset cifar10 --model wrn RNN_CIFAR --eval-attacks fgsm,pgd,cw,rnn,aa | 
TABLE
)
# Xiong & Hsieh: no code and no readable full text; the baselines' official settings are used for every row
# (TRADES: CIFAR-10 eps 0.031, 10 steps of 0.007, lr 0.1 x0.1 at 75/90/100, 76 epochs, wd 2e-4, eval PGD-20 step
# 0.003; MNIST eps 0.3, 40 steps of 0.01, lr 0.01, 100 epochs), and T equals the baseline's step count.
RNN_MNIST="--steps 40 --step-size 0.01 --epochs 100 --lr 0.01"
RNN_CIFAR="--eps 0.031 --steps 10 --step-size 0.007 --epochs 76 --lr 0.1 --weight-decay 2e-4 --lr-milestones 75,90,100 --lr-milestone-base 1 --eval-steps 20 --eval-step-size 0.003"
# Fast-BAT's setting (train.py defaults): PreActResNet-18, 20 epochs, cyclic lr 0 -> 0.2 -> 0 per iteration peaking
# at epoch 10 (--cyclic_milestone) with CyclicLR's momentum cycle, SGD momentum 0.9, wd 5e-4, batch 128, the last 10%
# of the training set for validation (SVHN: 7326 of 73257) and the best epoch chosen there by PGD-50-10 with step
# eps/4 (each row's --val-step-size); RA-PGD = PGD-50-10, step eps/4; RA-AA = AutoAttack's standard version (aa).
# CIFAR-100 adds RandomRotation(15) (datasets.py); SVHN has no augmentation.
# SVHN uses lr 0.05, this project's choice (a peak of 0.2 is known to diverge on SVHN; the Fast-BAT SVHN lr was not read).
FASTBAT="--model preactresnet18 --epochs 20 --lr-schedule cyclic --lr 0.2 --lr-peak-epoch 10 --weight-decay 5e-4 --batch-size 128 --val-size 5000 --val-steps 50 --val-restarts 10 --eval-attacks fgsm,pgd,cw,aa --eval-steps 50 --eval-restarts 10"
# The L2L code's setting (train_l2l_*_cifar10.py): WRN-34-10, eps 0.031, 76 epochs, SGD lr 0.1 x0.1 when epoch >= 30,
# 60, 90 counting from 1, wd 2e-4, batch 128; evaluation "PGM-20" = PGD-20 step 0.003 (pgd_attack_cifar10.py) and
# "CW" = the optimisation-based CW-l_inf of cw.py (cw-linf).
L2L_CIFAR="--model wrn --depth 34 --width 10 --eps 0.031 --epochs 76 --lr 0.1 --weight-decay 2e-4 --lr-milestones 30,60,90 --lr-milestone-base 1 --batch-size 128 --eval-steps 20 --eval-step-size 0.003"

# The fast-AT family in full, in the order of the GPU checklist (step 3).
REPRO_FAST="fast-at-cifar10 fastbat-fast-bat-cifar10-eps8 fastbat-fast-at-cifar10-eps8 fastbat-fast-at-ga-cifar10-eps8
fastbat-fast-bat-cifar10-eps16 fastbat-fast-at-cifar10-eps16 fastbat-fast-at-ga-cifar10-eps16 fastbat-pgd2-cifar10-eps8"

# Every method of l2l.py (METHODS), for the benchmark.
METHODS="plain pgd-at trades fast-at fast-at-ga fast-bat pgd-at-bls rnn-adv rnn-trades l2l-naive l2l-grad l2l-2step"

case "${1:-list}" in
  list|-h|--help)
    echo "$RECIPES" | awk -F'|' '{gsub(/ +$/, "", $1); printf "%-32s %s\n", $1, $2}'
    ;;
  report)
    shift
    if [ $# -eq 0 ]; then set -- runs/*; fi
    exec ${PYTHON:-python} l2l.py --report "$@"
    ;;
  repro-fast)
    shift
    for name in $REPRO_FAST; do
      bash "$0" "$name" "$@"
    done
    ;;
  bench)
    shift
    for method in $METHODS; do
      ${PYTHON:-python} l2l.py --benchmark --method "$method" --dataset cifar10 --model preactresnet18 \
        --batch-size 128 "$@"
    done
    ;;
  *)
    name=$1; shift
    line=$(echo "$RECIPES" | awk -F'|' -v n="$name" '{k=$1; gsub(/ /, "", k)} k==n {print $3}')
    paper=$(echo "$RECIPES" | awk -F'|' -v n="$name" '{k=$1; gsub(/ /, "", k)} k==n {gsub(/ /, "", $4); print $4}')
    if [ -z "$line" ]; then
      echo "run.sh: unknown recipe '$name'; bash run.sh list shows them" >&2
      exit 2
    fi
    line="$line --recipe $name"
    if [ -n "$paper" ]; then line="$line --paper $paper"; fi
    # shellcheck disable=SC2086
    line=${line//L2L_CIFAR/$L2L_CIFAR}
    line=${line//FASTBAT/$FASTBAT}
    line=${line//RNN_MNIST/$RNN_MNIST}
    line=${line//RNN_CIFAR/$RNN_CIFAR}
    exec ${PYTHON:-python} l2l.py $line --out "runs/$name" "$@"
    ;;
esac
