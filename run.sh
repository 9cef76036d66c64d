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
#   bash run.sh gpu-check [--data-dir DIR] [--out DIR] [--budget S] [--dry-run]
#                                 a lent GPU's minutes as figures: CUDA correctness (tests, one short bf16 + compile
#                                 MNIST run per method), speed (the benchmark table), a paper row under AutoAttack;
#                                 time-boxed phases, each appending to OUT/gpu.md and OUT/gpu.json as it goes
#                                 (README, "Measured on GPU"); --dry-run: the same on the CPU at tiny sizes
#   bash run.sh same-checkpoints OTHER_L2L_PY [METHOD ...]
#                                 a refactor's check: every method (or those named) trained briefly on synthetic
#                                 MNIST- and CIFAR-shaped data by this l2l.py and by OTHER_L2L_PY (e.g. the previous
#                                 commit's), same seed, CPU; exit 1 unless every checkpoint tensor is bitwise equal
#                                 (SHAPES=mnist for the MNIST-shaped runs only)
# Each recipe writes to runs/NAME unless --out is given, and records its name and the paper's numbers (the
# table's last field: clean, an attack, aa = the paper's AutoAttack column) for the report. Every recipe ends with
# AutoAttack's standard version (aa) beside the paper's own attacks: robust accuracy is only as good as the attack.
# PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")"

# name | what it reproduces | flags for l2l.py (defaults not repeated: see python l2l.py --help) | paper's numbers
RECIPES=$(cat <<'TABLE'
quick-mnist      | A first robust model in under 5 minutes on 2 CPU cores, at eps 0.2 (not MNIST's usual 0.3: no short recipe holds up under AutoAttack there; README): PGD-3-AT, SmallCNN, 3 epochs on 8000 MNIST images, cyclic lr 0.1; AutoAttack on 50 test images (measured 108 s alone: 100% clean, 86% PGD-40, 70% AutoAttack; validation clean 97.0%) | --method pgd-at --dataset mnist --eps 0.2 --steps 3 --step-size 0.1 --lr-schedule cyclic --lr 0.1 --epochs 3 --train-size 8000 --val-size 500 --val-steps 5 --test-size 50 --eval-attacks fgsm,pgd,aa |
pgd-at-mnist     | Madry et al. 2018 MNIST setting (eps 0.3, PGD-40 step 0.01) on TRADES' SmallCNN, 100 epochs | --method pgd-at --dataset mnist | 
trades-mnist     | TRADES (Zhang et al. 2019) MNIST: SmallCNN, eps 0.3, 40 steps of 0.01, beta 1 = the MNIST script's default (README: 99.48 / 96.07 under a 40-step attack) | --method trades --dataset mnist --beta 1 | clean=99.48,pgd=96.07
pgd-at-cifar10   | PGD-10-AT (Madry et al.) as Rice et al.'s robust_overfitting trains it: PreActResNet-18 (shortcut on relu(bn1(x))), 200 epochs, reflect-padded crops, inputs normalised (std 0.2471), 1000 training images held out | --method pgd-at --dataset cifar10 --model preactresnet18 --epochs 200 --lr-milestones 100,150 | 
pgd-at-wrn-cifar10 | Madry et al. CIFAR-10 PGD-AT (87.30 / 45.80 as quoted by Fast-AT), WRN-34-10, PGD-10 step 2/255 | --method pgd-at --dataset cifar10 --model wrn --depth 34 --width 10 --weight-decay 2e-4 | clean=87.30,pgd=45.80
trades-cifar10   | TRADES CIFAR-10, WRN-34-10, beta 6, 10 steps of 0.007, eps 0.031 (README 84.92 / 56.61 PGD-20) | --method trades --dataset cifar10 --model wrn --eps 0.031 --beta 6 --eval-step-size 0.003 | clean=84.92,pgd=56.61
fast-at-cifar10  | Fast-AT (Wong et al. 2020), PreActResNet-18, 15 epochs cyclic 0.2, FGSM-RS step 10/255 (README 86.06 / 46.06, PGD-50-10) | --method fast-at --dataset cifar10 --epochs 15 --eval-attacks fgsm,pgd,cw,aa --eval-steps 50 --eval-restarts 10 --eval-step-size 2/255 | clean=86.06,pgd=46.06
plain-cifar10    | Standard training baseline, PreActResNet-18, 200 epochs (Fast-BAT: PGD-0) | --method plain --dataset cifar10 --eval-steps 20 | 
l2l-plain-cifar10  | L2L poster, CIFAR-10 "Plain" (95.22 clean / 0.00 PGM / 0.00 CW), WRN-34-10, the L2L schedule | --method plain --dataset cifar10 L2L_CIFAR --eval-attacks fgsm,pgd,cw-linf,aa | clean=95.22,pgd=0.00,cw-linf=0.00
l2l-pgm-cifar10    | L2L poster, CIFAR-10 "PGM net" (87.30 / 47.04); PGD-10 step 0.003 from x + 0.001 N(0, I), BN eval, as adv_loss_pgd (its mixed clean+adv loss is not reproduced) | --method pgd-at --dataset cifar10 --steps 10 --step-size 0.003 --attack-bn eval --attack-start normal L2L_CIFAR --eval-attacks fgsm,pgd,cw-linf,aa | clean=87.30,pgd=47.04
l2l-naive-cifar10  | L2L poster, CIFAR-10 "Naive L2L" (94.53 / 0.01 / 0) | --method l2l-naive --dataset cifar10 L2L_CIFAR --l2l-attacker wide --eval-attacks fgsm,pgd,cw-linf,l2l,aa | clean=94.53,pgd=0.01,cw-linf=0.00
l2l-grad-cifar10   | L2L poster, CIFAR-10 "Grad L2L" (85.84 / 51.17 / 53.5) | --method l2l-grad --dataset cifar10 L2L_CIFAR --l2l-attacker wide --eval-attacks fgsm,pgd,cw-linf,l2l,aa | clean=85.84,pgd=51.17,cw-linf=53.50
l2l-2step-cifar10  | L2L poster, CIFAR-10 "2-Step L2L" (85.35 / 54.32 / 57.07) | --method l2l-2step --dataset cifar10 L2L_CIFAR --l2l-attacker wide --eval-attacks fgsm,pgd,cw-linf,l2l,aa | clean=85.35,pgd=54.32,cw-linf=57.07
l2l-plain-cifar100 | L2L poster, CIFAR-100 "Plain" (76.10 / 0.13 / 0.00) | --method plain --dataset cifar100 L2L_CIFAR --eval-attacks fgsm,pgd,cw-linf,aa | clean=76.10,pgd=0.13,cw-linf=0.00
l2l-pgm-cifar100   | L2L poster, CIFAR-100 "PGM net" (62.68 / 23.75 / 25.95) | --method pgd-at --dataset cifar100 --steps 10 --step-size 0.003 --attack-bn eval --attack-start normal L2L_CIFAR --eval-attacks fgsm,pgd,cw-linf,aa | clean=62.68,pgd=23.75,cw-linf=25.95
l2l-naive-cifar100 | L2L poster, CIFAR-100 naive L2L (no number in the poster) | --method l2l-naive --dataset cifar100 L2L_CIFAR --l2l-attacker wide --eval-attacks fgsm,pgd,cw-linf,l2l,aa | 
l2l-grad-cifar100  | L2L poster, CIFAR-100 "Grad L2L" (62.18 / 28.67 / 29.65) | --method l2l-grad --dataset cifar100 L2L_CIFAR --l2l-attacker wide --eval-attacks fgsm,pgd,cw-linf,l2l,aa | clean=62.18,pgd=28.67,cw-linf=29.65
l2l-2step-cifar100 | L2L poster, CIFAR-100 "2-Step L2L" (60.95 / 31.03 / 32.28) | --method l2l-2step --dataset cifar100 L2L_CIFAR --l2l-attacker wide --eval-attacks fgsm,pgd,cw-linf,l2l,aa | clean=60.95,pgd=31.03,cw-linf=32.28
fastbat-fast-at-cifar10-eps8   | Fast-BAT Table 1 (arXiv v1), Fast-AT, eps 8/255: 45.47 RA-PGD / 41.97 RA-AA / 81.72 SA | --method fast-at --dataset cifar10 --eps 8/255 FASTBAT --input-std 0.2470,0.2435,0.2616 --val-step-size 2/255 | clean=81.72,pgd=45.47,aa=41.97
fastbat-fast-at-ga-cifar10-eps8 | Fast-BAT Table 1 (arXiv v1), Fast-AT-GA, eps 8/255: 47.43 / 43.52 / 79.84 | --method fast-at-ga --dataset cifar10 --eps 8/255 FASTBAT --val-step-size 2/255 | clean=79.84,pgd=47.43,aa=43.52
fastbat-fast-bat-cifar10-eps8  | Fast-BAT Table 1 (arXiv v1), Fast-BAT, eps 8/255: 48.74 / 44.89 / 79.43 | --method fast-bat --dataset cifar10 --eps 8/255 FASTBAT --val-step-size 2/255 | clean=79.43,pgd=48.74,aa=44.89
fastbat-pgd2-cifar10-eps8      | PGD-2-AT (2 steps of eps/2, random start) baseline of Fast-BAT, cifar10, eps 8/255 (no number read) | --method pgd-at --steps 2 --step-size 4/255 --dataset cifar10 --eps 8/255 FASTBAT --input-std 0.2470,0.2435,0.2616 --val-step-size 2/255 | 
fastbat-fast-at-cifar10-eps16  | Fast-BAT Table 1 (arXiv v1), Fast-AT, eps 16/255: 21.79 / 12.57 / 46.02 | --method fast-at --dataset cifar10 --eps 16/255 FASTBAT --input-std 0.2470,0.2435,0.2616 --val-step-size 4/255 | clean=46.02,pgd=21.79,aa=12.57
fastbat-fast-at-ga-cifar10-eps16 | Fast-BAT Table 1 (arXiv v1), Fast-AT-GA, eps 16/255: 26.22 / 18.03 / 58.57 | --method fast-at-ga --dataset cifar10 --eps 16/255 FASTBAT --val-step-size 4/255 | clean=58.57,pgd=26.22,aa=18.03
fastbat-fast-bat-cifar10-eps16 | Fast-BAT Table 1 (arXiv v1), Fast-BAT, eps 16/255: 26.15 / 18.21 / 67.79 | --method fast-bat --dataset cifar10 --eps 16/255 FASTBAT --val-step-size 4/255 | clean=67.79,pgd=26.15,aa=18.21
fastbat-pgd2-cifar10-eps16     | PGD-2-AT (2 steps of eps/2, random start) baseline of Fast-BAT, cifar10, eps 16/255 (no number read) | --method pgd-at --steps 2 --step-size 8/255 --dataset cifar10 --eps 16/255 FASTBAT --input-std 0.2470,0.2435,0.2616 --val-step-size 4/255 | 
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
# Each RNN row and its baseline row share every setting but the inner maximiser: the attack's BN mode is eval for all
# (TRADES' code and the RNN rows' default), so AdvTrain and AdvTrain+BLS do not differ from RNN-Adv in two things.
RNN_MNIST="--attack-bn eval --steps 40 --step-size 0.01 --epochs 100 --lr 0.01"
RNN_CIFAR="--attack-bn eval --eps 0.031 --steps 10 --step-size 0.007 --epochs 76 --lr 0.1 --weight-decay 2e-4 --lr-milestones 75,90,100 --lr-milestone-base 1 --eval-steps 20 --eval-step-size 0.003"
# Fast-BAT's setting (train.py defaults): PreActResNet-18, 20 epochs, cyclic lr 0 -> 0.2 -> 0 per iteration peaking
# at epoch 10 (--cyclic_milestone) with CyclicLR's momentum cycle, SGD momentum 0.9, wd 5e-4, batch 128, the last 10%
# of the training set for validation (SVHN: 7326 of 73257) and the best epoch chosen there by PGD-50-10 with step
# eps/4 (each row's --val-step-size); RA-PGD = PGD-50-10, step eps/4; RA-AA = AutoAttack's standard version (aa).
# CIFAR-100 adds RandomRotation(15) (datasets.py); SVHN has no augmentation.
# SVHN uses lr 0.05, this project's choice (a peak of 0.2 is known to diverge on SVHN; the Fast-BAT SVHN lr was not read).
FASTBAT="--normalize mean-std --preact-shortcut input --crop-pad zero --model preactresnet18 --epochs 20 --lr-schedule cyclic --lr 0.2 --lr-peak-epoch 10 --weight-decay 5e-4 --batch-size 128 --val-size 5000 --val-steps 50 --val-restarts 10 --eval-attacks fgsm,pgd,cw,aa --eval-steps 50 --eval-restarts 10"
# The L2L code's setting (train_l2l_*_cifar10.py): WRN-34-10, eps 0.031, 76 epochs, SGD lr 0.1 x0.1 when epoch >= 30,
# 60, 90 counting from 1, wd 2e-4, batch 128; evaluation "PGM-20" = PGD-20 step 0.003 (pgd_attack_cifar10.py) and
# "CW" = the optimisation-based CW-l_inf of cw.py (cw-linf).
L2L_CIFAR="--normalize none --crop-pad zero --model wrn --depth 34 --width 10 --eps 0.031 --epochs 76 --lr 0.1 --weight-decay 2e-4 --lr-milestones 30,60,90 --lr-milestone-base 1 --batch-size 128 --eval-steps 20 --eval-step-size 0.003"

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
  same-checkpoints)
    shift
    exec ${PYTHON:-python} - "$@" <<'SAME'
"""Train every method (or the named ones) for one short epoch with this l2l.py and with another one, on the same
synthetic data, seed and flags, on the CPU, and compare the two last.pt files tensor by tensor (weights, optimiser
state, learned networks, random-generator state, the per-epoch history without its timings)."""
import os, subprocess, sys, tempfile
import torch
sys.path.insert(0, os.getcwd())
import l2l
if not sys.argv[1:] or not os.path.isfile(sys.argv[1]):
    sys.exit("run.sh: same-checkpoints needs the path of another l2l.py, e.g. one from git worktree add")
other, methods = sys.argv[1], sys.argv[2:] or list(l2l.METHODS)
work = tempfile.mkdtemp(prefix="same-checkpoints-")
gen = torch.Generator().manual_seed(0)
for name, n in (("mnist", 320), ("cifar10", 96)):
    c, h, w = l2l.DATASETS[name]["shape"]
    l2l.write_npz(os.path.join(work, f"{name}.npz"), {
        "x_train": torch.randint(0, 256, (n, h, w, c), generator=gen, dtype=torch.uint8),
        "y_train": torch.randint(0, 10, (n,), generator=gen), "x_test": torch.randint(0, 256, (16, h, w, c),
        generator=gen, dtype=torch.uint8), "y_test": torch.randint(0, 10, (16,), generator=gen)})
SHAPES = {"mnist": ["--dataset", "mnist", "--train-size", "256", "--val-size", "64", "--batch-size", "64"],
          "cifar": ["--dataset", "cifar10", "--model", "wrn", "--depth", "10", "--width", "1", "--train-size", "64",
                    "--val-size", "32", "--batch-size", "32", "--lr-peak-epoch", "0.5"]}
SHAPES = {k: v for k, v in SHAPES.items() if k in os.environ.get("SHAPES", "mnist,cifar").split(",")}
COMMON = ["--data-dir", work, "--epochs", "1", "--test-size", "8", "--steps", "2", "--eval-attacks", "fgsm",
          "--val-steps", "2", "--l2l-width", "16", "--seed", "0", "--device", "cpu", "--quiet"]


def tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            if "seconds" not in str(k):
                yield from tensors(obj[k], f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


differ = 0
for method in methods:
    for shape, flags in SHAPES.items():
        states = []
        for i, script in enumerate((os.path.join(os.getcwd(), "l2l.py"), other)):
            out = os.path.join(work, f"{method}-{shape}-{i}")
            r = subprocess.run([sys.executable, script, "--method", method, *flags, *COMMON, "--out", out],
                               capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if r.returncode:
                states.append("failed: " + (r.stderr.strip().splitlines() or ["?"])[-1])
                continue
            ckpt = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=False)
            states.append(dict(tensors({k: v for k, v in ckpt.items() if k not in ("args", "format")})))
        if any(isinstance(s, str) for s in states):
            same, why = False, "; ".join(s for s in states if isinstance(s, str))
        else:
            a, b = states
            bad = [k for k in a if k not in b or (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor)
                                                  and isinstance(b[k], torch.Tensor) else a[k] == b[k]) is False]
            same, why = not bad and set(a) == set(b), ", ".join(bad[:3]) or "keys differ"
        differ += not same
        print(f"{method:12s} {shape:6s} {'bitwise equal' if same else 'DIFFERENT: ' + why}", flush=True)
print(f"{differ} of {len(methods) * len(SHAPES)} runs differ")
import shutil
shutil.rmtree(work, ignore_errors=True)
sys.exit(1 if differ else 0)
SAME
    ;;
  gpu-check)
    shift
    exec ${PYTHON:-python} - "$@" <<'GPUCHECK'
"""bash run.sh gpu-check [--data-dir DIR] [--out DIR] [--budget S] [--dry-run]: one time-boxed command that turns a lent
GPU's minutes into figures. Phases, most valuable first, each appending to OUT/gpu.md and rewriting OUT/gpu.json as
soon as each of its items ends (a command cut off at its limit still leaves everything finished so far):
  1. correct on CUDA: a subset of the test suite with L2L_TEST_DEVICE=cuda, then one short real MNIST run per method
     with --precision bf16 --channels-last --compile, each checked for finite loss and the eps-ball constraint;
  2. speed: --benchmark of every method on CIFAR-10's shape (PreActResNet-18, synthetic data), fp32 and
     bf16 + channels-last + compile, batch 128 and 512;
  3. a paper row: with cifar10.npz in --data-dir, Fast-AT's 15 epochs, then Fast-BAT at 8/255; else the TRADES MNIST
     recipe for as many epochs as fit; each evaluated with AutoAttack, beside the paper's numbers.
--dry-run runs the same phases on the CPU at tiny sizes (synthetic MNIST when --data-dir has none), in under a minute.
Runs are written under OUT/../gpu-check-work (not OUT: a device call brings back only 8 files)."""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

T0 = time.time()
HERE = os.getcwd()


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"run.sh gpu-check: error: {message} (see bash run.sh gpu-check --help)\n")


p = Parser(prog="bash run.sh gpu-check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data-dir", default="data", help="folder with MNIST/ or mnist.npz, and optionally cifar10.npz")
p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu-check", help="where gpu.md and gpu.json go "
               "(default: $OUT on a device machine, else runs/gpu-check)")
p.add_argument("--budget", type=float, default=540.0, help="seconds of wall time for all phases (default 540: "
               "one 10-minute device call with a minute to spare)")
p.add_argument("--dry-run", action="store_true", help="the same phases on the CPU at tiny sizes")
opts = p.parse_args()
if not (opts.budget > 0 and math.isfinite(opts.budget)):
    p.error(f"--budget {opts.budget:g} must be a positive number of seconds")
DRY = opts.dry_run
PY = os.environ.get("PYTHON", sys.executable)
OUT = opts.out
WORK = os.path.join(os.path.dirname(os.path.abspath(OUT)), os.path.basename(os.path.abspath(OUT)) + "-work")
try:
    os.makedirs(OUT, exist_ok=True)
    os.makedirs(WORK, exist_ok=True)
except OSError as e:
    p.error(f"cannot create --out {OUT} ({e.strerror}); pass a writable folder")
sys.path.insert(0, HERE)
import torch  # noqa: E402

import l2l  # noqa: E402

if not DRY and not torch.cuda.is_available():
    p.error("torch sees no CUDA device; run it on a GPU machine, or pass --dry-run to try the phases on this CPU")
DEV = "cpu" if DRY else "cuda"
GPU = "CPU (dry run)" if DRY else torch.cuda.get_device_name(0)
METHODS = list(l2l.METHODS)
# phase boxes as fractions of the budget (what one phase leaves unused goes to the next)
BOXES = {"correctness": 0.35, "speed": 0.30, "paper row": 0.35}
report = {"gpu": GPU, "dry_run": DRY, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
          "command": "bash run.sh gpu-check " + " ".join(sys.argv[1:]), "budget_s": opts.budget,
          "torch": torch.__version__, "phases": {}}


def left() -> float:
    return opts.budget - (time.time() - T0)


def write_json():
    tmp = os.path.join(OUT, "gpu.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, os.path.join(OUT, "gpu.json"))


def md(text: str):
    with open(os.path.join(OUT, "gpu.md"), "a") as f:
        f.write(text + "\n")
    print(text, flush=True)


def run(cmd, timeout, env=None, log=None):
    """(exit code or 'timeout', seconds, output) of a command, cut off after `timeout` seconds."""
    t = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1), env={**os.environ, **(env or {})})
        code, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        code = "timeout"
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    if log:
        with open(os.path.join(OUT, log), "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{out}\n[exit {code}, {time.time() - t:.1f} s]\n\n")
    return code, time.time() - t, out


def mnist_dir() -> str:
    """The data folder holding MNIST, or in a dry run without it a synthetic MNIST-format one; '' if none."""
    if os.path.isfile(os.path.join(opts.data_dir, "mnist.npz")) or os.path.isdir(os.path.join(opts.data_dir, "MNIST")):
        return opts.data_dir
    if not DRY:
        return ""
    d = os.path.join(WORK, "synthetic-data")
    if not os.path.isfile(os.path.join(d, "mnist.npz")):
        g = torch.Generator().manual_seed(0)
        arrays = {"x_train": torch.randint(0, 256, (600, 28, 28, 1), dtype=torch.uint8, generator=g),
                  "y_train": torch.randint(0, 10, (600,), generator=g),
                  "x_test": torch.randint(0, 256, (100, 28, 28, 1), dtype=torch.uint8, generator=g),
                  "y_test": torch.randint(0, 10, (100,), generator=g)}
        os.makedirs(d, exist_ok=True)
        l2l.write_npz(os.path.join(d, "mnist.npz"), arrays)
    return d


def results(out_dir):
    try:
        with open(os.path.join(out_dir, "results.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def pct(value):
    return "–" if value is None else f"{100 * value:.2f}"


# ------------------------------------------------------------------------------------------------ phase 1
def phase_correctness(box_end):
    phase = report["phases"]["correctness"] = {"tests": None, "runs": []}
    md(f"\n## 1. Correct on {'the CPU (dry run)' if DRY else 'CUDA'}\n")
    subset = ("project_is_the_exact_projection or square_schedule" if DRY else
              "stays_in_eps_ball or bf16 or lowers_its_loss or round_trip or fab or square or autoattack or apgd "
              "or cw_linf or resume")
    cmd = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_l2l.py", "-k", subset]
    code, secs, out = run(cmd, min(120 if not DRY else 60, box_end - time.time()),
                          env={"L2L_TEST_DEVICE": DEV}, log="tests.log")
    summary = next((line for line in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed)", line)),
                   f"no summary (exit {code})")
    failed = re.findall(r"^FAILED (\S+)", out, re.M)
    phase["tests"] = {"subset": subset, "exit": code, "seconds": round(secs, 1), "summary": summary.strip("= "),
                      "failed": failed}
    md(f"Tests (`L2L_TEST_DEVICE={DEV} pytest -k \"{subset}\"`): {summary.strip('= ')} in {secs:.0f} s"
       + (f"; FAILED: {', '.join(failed)}" if failed else "") + " (log: tests.log)\n")
    write_json()
    data = mnist_dir()
    if not data:
        md("Short MNIST runs: skipped, no MNIST in --data-dir (copy ../shared/data/MNIST there and carry it)\n")
        return
    md("Short real MNIST run per method, `--precision bf16 --channels-last --compile`"
       + (" (dry run: fp32, eager, synthetic data)" if DRY else "") + ":\n")
    md("| method | exit | s | train loss | max pert. / eps | clean | pgd | aa | check |")
    md("|---|---|---|---|---|---|---|---|---|")
    size = (["--train-size", "64", "--val-size", "32", "--test-size", "16", "--batch-size", "32", "--steps", "2",
             "--eval-steps", "2", "--val-steps", "2", "--l2l-width", "8", "--apgd-steps", "3", "--apgd-targets", "2",
             "--fab-steps", "3", "--fab-targets", "2", "--square-queries", "10"] if DRY else
            ["--train-size", "4096", "--val-size", "512", "--test-size", "500", "--val-steps", "5",
             "--apgd-steps", "25", "--fab-steps", "25", "--square-queries", "500",
             "--precision", "bf16", "--channels-last", "--compile"])
    order = ["pgd-at", "trades", "fast-at", "fast-bat", "rnn-adv", "rnn-trades", "l2l-2step", "fast-at-ga",
             "pgd-at-bls", "l2l-grad", "l2l-naive", "plain"]
    for method in (order[:1] if DRY else order):
        if time.time() > box_end - 5:
            md(f"| {method} | not run: the phase's time box ended | | | | | | | |")
            phase["runs"].append({"method": method, "ran": False})
            continue
        out_dir = os.path.join(WORK, "runs", method)
        cmd = [PY, "l2l.py", "--method", method, "--dataset", "mnist", "--data-dir", data, "--epochs", "1",
               "--eval-attacks", "fgsm,pgd,aa", "--out", out_dir, "--overwrite", "--quiet", "--device", DEV, *size]
        code, secs, out = run(cmd, box_end - time.time(), log="runs.log")
        res = results(out_dir) if code == 0 else None
        loss = res["history"][-1]["train_loss"] if res else None
        eps = res["protocol"]["eps"] if res else None
        pert = max(res[k]["max_perturbation"] for k in ("fgsm", "pgd", "aa")) if res else None
        ok = bool(res) and math.isfinite(loss) and pert <= eps + 1e-6
        phase["runs"].append({"method": method, "ran": True, "exit": code, "seconds": round(secs, 1),
                              "train_loss": loss, "max_perturbation": pert, "eps": eps, "passed": ok,
                              **({k: res[k]["accuracy"] for k in ("clean", "pgd", "aa")} if res else {})})
        md(f"| {method} | {code} | {secs:.0f} | {'–' if loss is None else f'{loss:.3f}'} | "
           f"{'–' if pert is None else f'{pert / eps:.4f}'} | {pct(res and res['clean']['accuracy'])} | "
           f"{pct(res and res['pgd']['accuracy'])} | {pct(res and res['aa']['accuracy'])} | "
           f"{'pass' if ok else 'FAIL (runs.log)'} |")
        write_json()
    md("")


# ------------------------------------------------------------------------------------------------ phase 2
def bench_cmd(method, batch, fast):
    if DRY:
        shape = ["--dataset", "mnist", "--model", "smallcnn", "--bench-steps", "1", "--bench-warmup", "0", "--steps", "2"]
    else:
        shape = ["--dataset", "cifar10", "--model", "preactresnet18", "--bench-steps", "10",
                 "--bench-warmup", "3" if fast else "2"]
    extra = (["--precision", "bf16", "--channels-last"] + ([] if DRY else ["--compile"])) if fast else []
    code = ("import json, sys, l2l; a = l2l.parse_args(sys.argv[1:]); "
            "print('FIGURES ' + json.dumps(l2l.benchmark(a)))")
    return [PY, "-c", code, "--benchmark", "--method", method, "--batch-size", str(batch), "--device", DEV,
            *shape, *extra]


def phase_speed(box_end):
    phase = report["phases"]["speed"] = {"benchmarks": []}
    md("\n## 2. Speed: `--benchmark`, " + ("MNIST shape, SmallCNN (dry run)" if DRY else
                                            "CIFAR-10 shape, PreActResNet-18, synthetic data") + "\n")
    md("| method | precision | batch | img/s | s/epoch | TFLOP/s | % of peak | memory |")
    md("|---|---|---|---|---|---|---|---|")
    configs = [(128, False), (128, True), (512, False), (512, True)] if not DRY else [(16, False), (16, True)]
    methods = ["pgd-at"] if DRY else METHODS
    for batch, fast in configs:
        for method in methods:
            label = ("bf16+cl" + ("" if DRY else "+compile")) if fast else "fp32"
            if time.time() > box_end - 5:
                phase["benchmarks"].append({"method": method, "batch": batch, "precision": label, "ran": False})
                continue
            code, secs, out = run(bench_cmd(method, batch, fast), min(90, box_end - time.time()), log="bench.log")
            line = next((l for l in out.splitlines() if l.startswith("FIGURES ")), None)
            if line is None:
                phase["benchmarks"].append({"method": method, "batch": batch, "precision": label, "ran": True,
                                            "exit": code})
                md(f"| {method} | {label} | {batch} | failed ({code}, bench.log) | | | | |")
                continue
            f = json.loads(line[8:])
            phase["benchmarks"].append({"ran": True, "label": label, **f})
            frac = f"{100 * f['fraction_of_peak']:.1f}" if f.get("fraction_of_peak") else "–"
            md(f"| {method} | {label} | {batch} | {f['images_per_second']:,.0f} | {f['seconds_per_epoch']:.1f} | "
               f"{f['tflops_per_second']:.2f} | {frac} | {f['memory']} |")
            write_json()
    skipped = sum(1 for b in phase["benchmarks"] if not b["ran"])
    if skipped:
        md(f"\n{skipped} benchmark configurations did not fit the phase's time box.")
    md("")


# ------------------------------------------------------------------------------------------------ phase 3
def throughput(method, batch=512):
    """Measured training images/s of `method` in phase 2 (bf16 first), or None."""
    rows = [b for b in report["phases"].get("speed", {}).get("benchmarks", [])
            if b.get("ran") and b.get("method") == method and "images_per_second" in b]
    rows.sort(key=lambda b: (b["batch"] != batch, "bf16" not in b["label"]))
    return rows[0]["images_per_second"] if rows else None


def paper_run(name, recipe_flags, paper, box_end, passes_per_test_image, epochs_cost):
    """One recipe run, its test size chosen to fit the time left; returns its row."""
    time_left = box_end - time.time()
    test_size = next((n for n in (10000, 5000, 2000, 1000, 500) if epochs_cost + n * passes_per_test_image
                      < 0.8 * time_left), 200)
    out_dir = os.path.join(WORK, "runs", name)
    cmd = ["bash", "run.sh", name, *recipe_flags, "--test-size", str(test_size), "--out", out_dir, "--overwrite",
           "--quiet", "--device", DEV]
    code, secs, out = run(cmd, box_end - time.time(), log="paper.log")
    res = results(out_dir) if code == 0 else None
    row = {"recipe": name, "exit": code, "seconds": round(secs, 1), "test_size": test_size, "paper": paper}
    if res:
        hist = res.get("history") or []
        row.update({k: res[k]["accuracy"] for k in ("clean", "pgd", "aa") if k in res},
                   epochs=len(hist), best_epoch=res.get("best_epoch"),
                   seconds_per_epoch=round(sum(h["train_seconds"] for h in hist) / max(len(hist), 1), 1))
    return row


def phase_paper(box_end):
    phase = report["phases"]["paper row"] = {"rows": []}
    md("\n## 3. A paper row\n")
    has_cifar = os.path.isfile(os.path.join(opts.data_dir, "cifar10.npz"))
    rows = []
    if has_cifar and not DRY:
        ips = throughput("fast-at") or 5000.0
        # Fast-AT: 15 epochs x 49000 images x 2 passes; evaluation ~ 4000 passes per test image (PGD-50-10, AA)
        rows.append(paper_run("fast-at-cifar10", ["--data-dir", opts.data_dir, "--precision", "bf16",
                                                  "--channels-last"], {"clean": 86.06, "pgd": 46.06}, box_end,
                              4000 / (ips * 2), 15 * 49000 / ips))
        if box_end - time.time() > 120:
            ips = throughput("fast-bat") or 3000.0
            rows.append(paper_run("fastbat-fast-bat-cifar10-eps8", ["--data-dir", opts.data_dir, "--precision",
                                                                    "bf16", "--channels-last"],
                                  {"clean": 79.43, "pgd": 48.74, "aa": 44.89}, box_end, 4000 / (ips * 2),
                                  20 * 45000 / ips))
    else:
        data = mnist_dir()
        if not data:
            md("No MNIST and no cifar10.npz in --data-dir: no paper row.")
            write_json()
            return
        if DRY:
            epochs, extra = 1, ["--train-size", "64", "--val-size", "32", "--batch-size", "32", "--steps", "2",
                                "--eval-steps", "2", "--val-steps", "2", "--eval-attacks", "pgd,aa", "--apgd-steps",
                                "3", "--apgd-targets", "2", "--fab-steps", "3", "--fab-targets", "2",
                                "--square-queries", "10"]
        else:
            # s/epoch of TRADES-40 on SmallCNN, measured here in one short benchmark
            code, secs, out = run([*bench_cmd("trades", 128, True)[:3], "--benchmark", "--method", "trades",
                                   "--dataset", "mnist", "--model", "smallcnn", "--beta", "1", "--precision", "bf16",
                                   "--channels-last", "--bench-steps", "10", "--bench-warmup", "2", "--device", DEV],
                                  60, log="paper.log")
            line = next((l for l in out.splitlines() if l.startswith("FIGURES ")), None)
            figures = json.loads(line[8:]) if line else None
            per_epoch = figures["seconds_per_epoch"] * 1.15 if figures else 60.0
            # evaluation: ~4000 forward-backward passes per test image (PGD-40, CW-40, AutoAttack), a step being 41
            eval_s = 10000 * 4000 / (figures["images_per_second"] * 41) if figures else 120.0
            epochs = max(1, min(100, int((box_end - time.time() - eval_s - 20) / per_epoch)))
            extra = ["--epochs", str(epochs), "--precision", "bf16", "--channels-last"]
            md(f"TRADES MNIST: {per_epoch:.1f} s per epoch measured, so {epochs} of the recipe's 100 epochs fit "
               f"(its lr would drop at epoch 55).")
        out_dir = os.path.join(WORK, "runs", "trades-mnist")
        cmd = ["bash", "run.sh", "trades-mnist", "--data-dir", data, "--out", out_dir, "--overwrite", "--quiet",
               "--device", DEV, *(["--epochs", str(epochs)] if DRY else []), *extra]
        code, secs, out = run(cmd, box_end - time.time(), log="paper.log")
        res = results(out_dir) if code == 0 else None
        row = {"recipe": "trades-mnist", "exit": code, "seconds": round(secs, 1), "epochs": epochs,
               "paper": {"clean": 99.48, "pgd": 96.07}}
        if res:
            hist = res.get("history") or []
            row.update({k: res[k]["accuracy"] for k in ("clean", "pgd", "aa") if k in res},
                       test_size=res["protocol"]["examples"], best_epoch=res.get("best_epoch"),
                       seconds_per_epoch=round(sum(h["train_seconds"] for h in hist) / max(len(hist), 1), 1))
        rows.append(row)
    md("| recipe | exit | epochs (best) | test images | clean (paper) | PGD (paper) | AutoAttack (paper) | s/epoch | s |")
    md("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        paper = r["paper"]
        cell = lambda k: f"{pct(r.get(k))} ({paper[k]:.2f})" if k in paper else pct(r.get(k))
        md(f"| {r['recipe']} | {r['exit']} | {r.get('epochs', '–')} ({r.get('best_epoch', '–')}) | "
           f"{r.get('test_size', '–')} | {cell('clean')} | {cell('pgd')} | {cell('aa')} | "
           f"{r.get('seconds_per_epoch', '–')} | {r['seconds']:.0f} |")
    phase["rows"] = rows
    write_json()


md(f"# gpu-check: {GPU}, {report['date']}\n\n`{report['command']}` (budget {opts.budget:.0f} s, torch "
   f"{torch.__version__})")
write_json()
start = time.time()
ends, t = {}, start
for name, frac in BOXES.items():
    t += frac * opts.budget
    ends[name] = t
for name, fn in (("correctness", phase_correctness), ("speed", phase_speed), ("paper row", phase_paper)):
    if left() < 10:
        md(f"\n## {name}: not run, the budget is spent")
        continue
    # a phase may use the time an earlier one left unused, never the later phases' share
    fn(ends[name] if name != "paper row" else T0 + opts.budget)
report["seconds"] = round(time.time() - T0, 1)
write_json()
md(f"\ngpu-check ended after {report['seconds']:.0f} s; figures in {OUT}/gpu.md and gpu.json")
GPUCHECK
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
    if [ "$name" = quick-mnist ]; then
      echo "quick-mnist: eps 0.2, not the 0.3 of the MNIST papers (at 0.3 no recipe this short keeps AutoAttack" \
           "accuracy above 16%; README, Run); AutoAttack on the first 50 test images" >&2
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
