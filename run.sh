#!/usr/bin/env bash
# Paper recipes for l2l.py, one per table row, with the paper's hyperparameters.
#   bash run.sh list              the recipes, where each fits (CPU or GPU, with the time where measured), what it is
#   bash run.sh show NAME         one recipe's whole description and its l2l.py command
#   bash run.sh NAME [flags...]   run one into runs/NAME; extra flags are passed on (e.g. --data-dir, --device)
#   bash run.sh report [RUN...]   one markdown table of the runs (default: each finished one) beside the papers' numbers
#   bash run.sh repro-fast [flags...]  the fast-AT family on CIFAR-10 in full, one recipe per row, in order
#   bash run.sh bench [flags...]  python l2l.py --benchmark for every method: CIFAR-10, PreActResNet-18, batch 128;
#                                 add e.g. --precision bf16 --channels-last --compile, --batch-size 512
#   bash run.sh attack-study pgd|learned CKPT OUT [flags...]  the fixed-model attack study (README)
#   bash run.sh gpu-check [--data-dir DIR] [--out DIR] [--dry-run]
#                                 on a GPU: the CUDA test subset, the benchmark (fp32; bf16 + channels-last +
#                                 compile) and the Fast-AT MNIST recipe, each under a time limit, each appending
#                                 to OUT/gpu.md; --dry-run: the same on the CPU at tiny sizes
# Each recipe records its name and the paper's numbers (the table's last field: clean, an attack, aa = the paper's
# AutoAttack column) for the report, and every recipe ends with AutoAttack's standard version (aa) beside the
# paper's own attacks: robust accuracy is only as good as the attack. PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}

# name | where it fits, and the time of one run where measured | what it reproduces | flags for l2l.py (defaults not
# repeated: see python l2l.py --help) | paper's numbers
RECIPES=$(cat <<'TABLE'
quick-mnist      | CPU 2 min  | A first robust model in under 5 minutes on 2 CPU cores, at eps 0.2 (not MNIST's usual 0.3: no short recipe holds up under AutoAttack there; README): PGD-3-AT, SmallCNN, 3 epochs on 8000 MNIST images, cyclic lr 0.1; AutoAttack on 50 test images (2026-12-04, 2-core CPU, alone: 97 s, 100% clean, 86% PGD-40, 70% AutoAttack; validation clean 97.0%) | --method pgd-at --dataset mnist --eps 0.2 --steps 3 --step-size 0.1 --lr-schedule cyclic --lr 0.1 --epochs 3 --train-size 8000 --val-size 500 --val-steps 5 --test-size 50 --eval-attacks fgsm,pgd,aa |
fast-at-mnist    | CPU 25 min | Fast-AT (Wong et al. 2020) MNIST as fast_adversarial's MNIST/train_mnist.py and evaluate_mnist.py: MNISTNet, Adam, cyclic lr peaking at 5e-3 in epoch 4 of 10, batch 100, FGSM step 0.375 from an unclamped U(-0.3, 0.3) start, all 60,000 training images (no validation split: the last epoch, as the script), PGD-50-10 step 0.01 on the 10,000 test images (no MNIST figure of the paper was read: README compares with the released models/fgsm.pth) | --method fast-at --dataset mnist --val-size 0 --eval-attacks fgsm,pgd,aa --eval-steps 50 --eval-step-size 0.01 --eval-restarts 10 | 
rnn-mnist-pgd-at | CPU 15 min | Xiong & Hsieh's MNIST claim at full data, the pair's baseline: PGD-10-AT at eps 0.1 (step 0.025 = 2.5 eps / T), MNISTNet (a 4-layer CNN), Adam lr 1e-3, 3 epochs on all 60,000 images; this project's budget (no code exists; README) | --method pgd-at --dataset mnist RNN_MNIST_PAIR | 
rnn-mnist-rnn-adv | CPU 30 min | The same pair's RNN-Adv: T = 10 learned steps (sign-step GRU, alpha 0.025) in place of PGD-10, every other setting equal | --method rnn-adv --dataset mnist RNN_MNIST_PAIR --eval-attacks fgsm,pgd,rnn,aa | 
pgd-at-mnist     | GPU        | Madry et al. 2018 MNIST setting (eps 0.3, PGD-40 step 0.01) on TRADES' SmallCNN, 100 epochs | --method pgd-at --dataset mnist | 
trades-mnist     | GPU        | TRADES (Zhang et al. 2019) MNIST: SmallCNN, eps 0.3, 40 steps of 0.01, beta 1 = the MNIST script's default (README: 99.48 / 96.07 under a 40-step attack) | --method trades --dataset mnist --beta 1 | clean=99.48,pgd=96.07
pgd-at-cifar10   | GPU        | PGD-10-AT (Madry et al.) as Rice et al.'s robust_overfitting trains it: PreActResNet-18 (shortcut on relu(bn1(x))), 200 epochs, reflect-padded crops, inputs normalised (std 0.2471), 1000 training images held out | --method pgd-at --dataset cifar10 --model preactresnet18 --epochs 200 --lr-milestones 100,150 | 
pgd-at-wrn-cifar10 | GPU        | Madry et al. CIFAR-10 PGD-AT (87.30 / 45.80 as quoted by Fast-AT), WRN-34-10, PGD-10 step 2/255 | --method pgd-at --dataset cifar10 --model wrn --depth 34 --width 10 --weight-decay 2e-4 | clean=87.30,pgd=45.80
trades-cifar10   | GPU        | TRADES CIFAR-10, WRN-34-10, beta 6, 10 steps of 0.007, eps 0.031 (README 84.92 / 56.61 PGD-20) | --method trades --dataset cifar10 --model wrn --eps 0.031 --beta 6 --eval-step-size 0.003 | clean=84.92,pgd=56.61
fast-at-cifar10  | GPU        | Fast-AT (Wong et al. 2020), PreActResNet-18, 15 epochs cyclic 0.2, FGSM-RS step 10/255 (README 86.06 / 46.06, PGD-50-10) | --method fast-at --dataset cifar10 --epochs 15 --eval-attacks fgsm,pgd,cw,aa --eval-steps 50 --eval-restarts 10 --eval-step-size 2/255 | clean=86.06,pgd=46.06
plain-cifar10    | GPU        | Standard training baseline, PreActResNet-18, 200 epochs (Fast-BAT: PGD-0) | --method plain --dataset cifar10 --eval-steps 20 | 
l2l-plain-cifar10  | GPU        | L2L poster, CIFAR-10 "Plain" (95.22 clean / 0.00 PGM / 0.00 CW), WRN-34-10, the L2L schedule | --method plain --dataset cifar10 L2L_CIFAR --eval-attacks fgsm,pgd,cw-linf,aa | clean=95.22,pgd=0.00,cw-linf=0.00
l2l-pgm-cifar10    | GPU        | L2L poster, CIFAR-10 "PGM net" (87.30 / 47.04); PGD-10 step 0.003 from x + 0.001 N(0, I), BN eval, as adv_loss_pgd (its mixed clean+adv loss is not reproduced) | --method pgd-at --dataset cifar10 --steps 10 --step-size 0.003 --attack-bn eval --attack-start normal L2L_CIFAR --eval-attacks fgsm,pgd,cw-linf,aa | clean=87.30,pgd=47.04
l2l-naive-cifar10  | GPU        | L2L poster, CIFAR-10 "Naive L2L" (94.53 / 0.01 / 0) | --method l2l-naive --dataset cifar10 L2L_CIFAR --l2l-attacker wide --eval-attacks fgsm,pgd,cw-linf,l2l,aa | clean=94.53,pgd=0.01,cw-linf=0.00
l2l-grad-cifar10   | GPU        | L2L poster, CIFAR-10 "Grad L2L" (85.84 / 51.17 / 53.5) | --method l2l-grad --dataset cifar10 L2L_CIFAR --l2l-attacker wide --eval-attacks fgsm,pgd,cw-linf,l2l,aa | clean=85.84,pgd=51.17,cw-linf=53.50
l2l-2step-cifar10  | GPU        | L2L poster, CIFAR-10 "2-Step L2L" (85.35 / 54.32 / 57.07) | --method l2l-2step --dataset cifar10 L2L_CIFAR --l2l-attacker wide --eval-attacks fgsm,pgd,cw-linf,l2l,aa | clean=85.35,pgd=54.32,cw-linf=57.07
l2l-plain-cifar100 | GPU        | L2L poster, CIFAR-100 "Plain" (76.10 / 0.13 / 0.00) | --method plain --dataset cifar100 L2L_CIFAR --eval-attacks fgsm,pgd,cw-linf,aa | clean=76.10,pgd=0.13,cw-linf=0.00
l2l-pgm-cifar100   | GPU        | L2L poster, CIFAR-100 "PGM net" (62.68 / 23.75 / 25.95) | --method pgd-at --dataset cifar100 --steps 10 --step-size 0.003 --attack-bn eval --attack-start normal L2L_CIFAR --eval-attacks fgsm,pgd,cw-linf,aa | clean=62.68,pgd=23.75,cw-linf=25.95
l2l-naive-cifar100 | GPU        | L2L poster, CIFAR-100 naive L2L (no number in the poster) | --method l2l-naive --dataset cifar100 L2L_CIFAR --l2l-attacker wide --eval-attacks fgsm,pgd,cw-linf,l2l,aa | 
l2l-grad-cifar100  | GPU        | L2L poster, CIFAR-100 "Grad L2L" (62.18 / 28.67 / 29.65) | --method l2l-grad --dataset cifar100 L2L_CIFAR --l2l-attacker wide --eval-attacks fgsm,pgd,cw-linf,l2l,aa | clean=62.18,pgd=28.67,cw-linf=29.65
l2l-2step-cifar100 | GPU        | L2L poster, CIFAR-100 "2-Step L2L" (60.95 / 31.03 / 32.28) | --method l2l-2step --dataset cifar100 L2L_CIFAR --l2l-attacker wide --eval-attacks fgsm,pgd,cw-linf,l2l,aa | clean=60.95,pgd=31.03,cw-linf=32.28
fastbat-fast-at-cifar10-eps8   | GPU        | Fast-BAT Table 1 (arXiv v1), Fast-AT, eps 8/255: 45.47 RA-PGD / 41.97 RA-AA / 81.72 SA | --method fast-at --dataset cifar10 --eps 8/255 FASTBAT --input-std 0.2470,0.2435,0.2616 --val-step-size 2/255 | clean=81.72,pgd=45.47,aa=41.97
fastbat-fast-at-ga-cifar10-eps8 | GPU        | Fast-BAT Table 1 (arXiv v1), Fast-AT-GA, eps 8/255: 47.43 / 43.52 / 79.84 | --method fast-at-ga --dataset cifar10 --eps 8/255 FASTBAT --val-step-size 2/255 | clean=79.84,pgd=47.43,aa=43.52
fastbat-fast-bat-cifar10-eps8  | GPU        | Fast-BAT Table 1 (arXiv v1), Fast-BAT, eps 8/255: 48.74 / 44.89 / 79.43 | --method fast-bat --dataset cifar10 --eps 8/255 FASTBAT --val-step-size 2/255 | clean=79.43,pgd=48.74,aa=44.89
fastbat-pgd2-cifar10-eps8      | GPU        | PGD-2-AT (2 steps of eps/2, random start) baseline of Fast-BAT, cifar10, eps 8/255 (no number read) | --method pgd-at --steps 2 --step-size 4/255 --dataset cifar10 --eps 8/255 FASTBAT --input-std 0.2470,0.2435,0.2616 --val-step-size 2/255 | 
fastbat-fast-at-cifar10-eps16  | GPU        | Fast-BAT Table 1 (arXiv v1), Fast-AT, eps 16/255: 21.79 / 12.57 / 46.02 | --method fast-at --dataset cifar10 --eps 16/255 FASTBAT --input-std 0.2470,0.2435,0.2616 --val-step-size 4/255 | clean=46.02,pgd=21.79,aa=12.57
fastbat-fast-at-ga-cifar10-eps16 | GPU        | Fast-BAT Table 1 (arXiv v1), Fast-AT-GA, eps 16/255: 26.22 / 18.03 / 58.57 | --method fast-at-ga --dataset cifar10 --eps 16/255 FASTBAT --val-step-size 4/255 | clean=58.57,pgd=26.22,aa=18.03
fastbat-fast-bat-cifar10-eps16 | GPU        | Fast-BAT Table 1 (arXiv v1), Fast-BAT, eps 16/255: 26.15 / 18.21 / 67.79 | --method fast-bat --dataset cifar10 --eps 16/255 FASTBAT --val-step-size 4/255 | clean=67.79,pgd=26.15,aa=18.21
fastbat-pgd2-cifar10-eps16     | GPU        | PGD-2-AT (2 steps of eps/2, random start) baseline of Fast-BAT, cifar10, eps 16/255 (no number read) | --method pgd-at --steps 2 --step-size 8/255 --dataset cifar10 --eps 16/255 FASTBAT --input-std 0.2470,0.2435,0.2616 --val-step-size 4/255 | 
fastbat-fast-at-cifar100-eps8  | GPU        | Fast-BAT's Fast-AT on cifar100, eps 8/255 (ICML tables not read: no number) | --method fast-at --dataset cifar100 --eps 8/255 FASTBAT --augment crop-flip-rotate --val-step-size 2/255 | 
fastbat-fast-at-ga-cifar100-eps8 | GPU        | Fast-BAT's Fast-AT-GA on cifar100, eps 8/255 (ICML tables not read: no number) | --method fast-at-ga --dataset cifar100 --eps 8/255 FASTBAT --augment crop-flip-rotate --val-step-size 2/255 | 
fastbat-fast-bat-cifar100-eps8 | GPU        | Fast-BAT's Fast-BAT on cifar100, eps 8/255 (ICML tables not read: no number) | --method fast-bat --dataset cifar100 --eps 8/255 FASTBAT --augment crop-flip-rotate --val-step-size 2/255 | 
fastbat-pgd2-cifar100-eps8     | GPU        | PGD-2-AT (2 steps of eps/2, random start) baseline of Fast-BAT, cifar100, eps 8/255 (no number read) | --method pgd-at --steps 2 --step-size 4/255 --dataset cifar100 --eps 8/255 FASTBAT --augment crop-flip-rotate --val-step-size 2/255 | 
fastbat-fast-at-cifar100-eps16 | GPU        | Fast-BAT's Fast-AT on cifar100, eps 16/255 (ICML tables not read: no number) | --method fast-at --dataset cifar100 --eps 16/255 FASTBAT --augment crop-flip-rotate --val-step-size 4/255 | 
fastbat-fast-at-ga-cifar100-eps16 | GPU        | Fast-BAT's Fast-AT-GA on cifar100, eps 16/255 (ICML tables not read: no number) | --method fast-at-ga --dataset cifar100 --eps 16/255 FASTBAT --augment crop-flip-rotate --val-step-size 4/255 | 
fastbat-fast-bat-cifar100-eps16 | GPU        | Fast-BAT's Fast-BAT on cifar100, eps 16/255 (ICML tables not read: no number) | --method fast-bat --dataset cifar100 --eps 16/255 FASTBAT --augment crop-flip-rotate --val-step-size 4/255 | 
fastbat-pgd2-cifar100-eps16    | GPU        | PGD-2-AT (2 steps of eps/2, random start) baseline of Fast-BAT, cifar100, eps 16/255 (no number read) | --method pgd-at --steps 2 --step-size 8/255 --dataset cifar100 --eps 16/255 FASTBAT --augment crop-flip-rotate --val-step-size 4/255 | 
fastbat-fast-at-svhn-eps8      | GPU        | Fast-BAT's Fast-AT on svhn, eps 8/255 (ICML tables not read: no number) | --method fast-at --dataset svhn --eps 8/255 FASTBAT --augment none --val-size 7326 --lr 0.05 --val-step-size 2/255 | 
fastbat-fast-at-ga-svhn-eps8   | GPU        | Fast-BAT's Fast-AT-GA on svhn, eps 8/255 (ICML tables not read: no number) | --method fast-at-ga --dataset svhn --eps 8/255 FASTBAT --augment none --val-size 7326 --lr 0.05 --val-step-size 2/255 | 
fastbat-fast-bat-svhn-eps8     | GPU        | Fast-BAT's Fast-BAT on svhn, eps 8/255 (ICML tables not read: no number) | --method fast-bat --dataset svhn --eps 8/255 FASTBAT --augment none --val-size 7326 --lr 0.05 --val-step-size 2/255 | 
fastbat-pgd2-svhn-eps8         | GPU        | PGD-2-AT (2 steps of eps/2, random start) baseline of Fast-BAT, svhn, eps 8/255 (no number read) | --method pgd-at --steps 2 --step-size 4/255 --dataset svhn --eps 8/255 FASTBAT --augment none --val-size 7326 --lr 0.05 --val-step-size 2/255 | 
fastbat-fast-at-svhn-eps16     | GPU        | Fast-BAT's Fast-AT on svhn, eps 16/255 (ICML tables not read: no number) | --method fast-at --dataset svhn --eps 16/255 FASTBAT --augment none --val-size 7326 --lr 0.05 --val-step-size 4/255 | 
fastbat-fast-at-ga-svhn-eps16  | GPU        | Fast-BAT's Fast-AT-GA on svhn, eps 16/255 (ICML tables not read: no number) | --method fast-at-ga --dataset svhn --eps 16/255 FASTBAT --augment none --val-size 7326 --lr 0.05 --val-step-size 4/255 | 
fastbat-fast-bat-svhn-eps16    | GPU        | Fast-BAT's Fast-BAT on svhn, eps 16/255 (ICML tables not read: no number) | --method fast-bat --dataset svhn --eps 16/255 FASTBAT --augment none --val-size 7326 --lr 0.05 --val-step-size 4/255 | 
fastbat-pgd2-svhn-eps16        | GPU        | PGD-2-AT (2 steps of eps/2, random start) baseline of Fast-BAT, svhn, eps 16/255 (no number read) | --method pgd-at --steps 2 --step-size 8/255 --dataset svhn --eps 16/255 FASTBAT --augment none --val-size 7326 --lr 0.05 --val-step-size 4/255 | 
cpu-fast-at-eps8     | CPU 45 min | Fast-BAT Table 1's fast-at, eps 8/255, at CPU scale (PreActResNet-18 width 8, 10 epochs, bf16; not the paper's scale: README, CIFAR-10 at CPU scale) | --method fast-at --eps 8/255 CPU_FASTBAT | 
cpu-fast-at-ga-eps8  | CPU 80 min | Fast-BAT Table 1's fast-at-ga, eps 8/255, at CPU scale (PreActResNet-18 width 8, 10 epochs, bf16; not the paper's scale: README, CIFAR-10 at CPU scale) | --method fast-at-ga --eps 8/255 CPU_FASTBAT | 
cpu-fast-bat-eps8    | CPU 85 min | Fast-BAT Table 1's fast-bat, eps 8/255, at CPU scale (PreActResNet-18 width 8, 10 epochs, bf16; not the paper's scale: README, CIFAR-10 at CPU scale) | --method fast-bat --eps 8/255 CPU_FASTBAT | 
cpu-pgd2-eps8        | CPU 50 min | Fast-BAT Table 1's PGD-2-AT, eps 8/255, at CPU scale (PreActResNet-18 width 8, 10 epochs, bf16; not the paper's scale: README, CIFAR-10 at CPU scale) | --method pgd-at --steps 2 --step-size 4/255 --eps 8/255 CPU_FASTBAT | 
cpu-fast-at-eps16    | CPU 52 min | Fast-BAT Table 1's fast-at, eps 16/255, at CPU scale (PreActResNet-18 width 8, 10 epochs, bf16; not the paper's scale: README, CIFAR-10 at CPU scale) | --method fast-at --eps 16/255 CPU_FASTBAT | 
cpu-fast-at-ga-eps16 | CPU 70 min | Fast-BAT Table 1's fast-at-ga, eps 16/255, at CPU scale (PreActResNet-18 width 8, 10 epochs, bf16; not the paper's scale: README, CIFAR-10 at CPU scale) | --method fast-at-ga --eps 16/255 CPU_FASTBAT | 
cpu-fast-bat-eps16   | CPU 85 min | Fast-BAT Table 1's fast-bat, eps 16/255, at CPU scale (PreActResNet-18 width 8, 10 epochs, bf16; not the paper's scale: README, CIFAR-10 at CPU scale) | --method fast-bat --eps 16/255 CPU_FASTBAT | 
cpu-pgd2-eps16       | CPU 50 min | Fast-BAT Table 1's PGD-2-AT, eps 16/255, at CPU scale (PreActResNet-18 width 8, 10 epochs, bf16; not the paper's scale: README, CIFAR-10 at CPU scale) | --method pgd-at --steps 2 --step-size 8/255 --eps 16/255 CPU_FASTBAT | 
cpu-pgd3-at                     | CPU 55 min | PGD-3-AT (T = 3, step 2.5 eps / 3, attack BN eval), the baseline of RNN-Adv, eps 8/255, at CPU scale (PreActResNet-18 width 8, 10 epochs, bf16; not the papers' scale: README) | --method pgd-at --steps 3 --step-size 20/765 --attack-bn eval CPU_LEARNED |
cpu-rnn-adv                     | CPU 90 min | RNN-Adv with T = 3 (sign-step GRU, alpha 2.5 eps / 3) against cpu-pgd3-at, eps 8/255, at CPU scale (PreActResNet-18 width 8, 10 epochs, bf16; not the papers' scale: README) | --method rnn-adv --steps 3 --step-size 20/765 CPU_LEARNED --eval-attacks pgd,cw-linf,rnn,aa |
cpu-l2l-pgm                     | CPU 80 min | L2L's PGM-net baseline (PGD-10 step 0.003 from x + 0.001 N(0, I), BN eval), eps 8/255, at CPU scale (PreActResNet-18 width 8, 10 epochs, bf16; not the papers' scale: README) | --method pgd-at --steps 10 --step-size 0.003 --attack-bn eval --attack-start normal CPU_LEARNED |
cpu-l2l-naive                   | CPU 35 min | Naive L2L, slim attacker of width 32, eps 8/255, at CPU scale (PreActResNet-18 width 8, 10 epochs, bf16; not the papers' scale: README) | --method l2l-naive CPU_LEARNED --l2l-width 32 --eval-attacks pgd,cw-linf,l2l,aa |
cpu-l2l-grad                    | CPU 70 min | Grad L2L, slim attacker of width 32, eps 8/255, at CPU scale (PreActResNet-18 width 8, 10 epochs, bf16; not the papers' scale: README) | --method l2l-grad CPU_LEARNED --l2l-width 32 --eval-attacks pgd,cw-linf,l2l,aa |
cpu-l2l-2step                   | CPU 90 min | 2-step L2L, slim attacker of width 32, eps 8/255, at CPU scale (PreActResNet-18 width 8, 10 epochs, bf16; not the papers' scale: README) | --method l2l-2step CPU_LEARNED --l2l-width 32 --eval-attacks pgd,cw-linf,l2l,aa |
rnn-t1-pgd-at-mnist            | GPU        | Xiong & Hsieh Table 1 'AdvTrain' (87.33 robust, dataset not named; MNIST assumed): PGD-40 | --method pgd-at --dataset mnist RNN_MNIST | 
rnn-t1-pgd-at-bls-mnist        | GPU        | Xiong & Hsieh Table 1 'AdvTrain+BLS' (88.71): PGD-40 with backtracking line search | --method pgd-at-bls --dataset mnist RNN_MNIST | 
rnn-t3-pgd-at-mnist          | GPU        | Xiong & Hsieh Table 3 (white-box, MNIST, 4-layer CNN), AdvTrain; T = 40 | --method pgd-at --dataset mnist RNN_MNIST --eval-attacks fgsm,pgd,cw,aa | 
rnn-t3-rnn-adv-mnist         | GPU        | Xiong & Hsieh Table 3 (white-box, MNIST, 4-layer CNN), RNN-Adv; T = 40 | --method rnn-adv --dataset mnist RNN_MNIST --eval-attacks fgsm,pgd,cw,rnn,aa | 
rnn-t3-trades-mnist          | GPU        | Xiong & Hsieh Table 3 (white-box, MNIST, 4-layer CNN), TRADES; T = 40 | --method trades --dataset mnist RNN_MNIST --eval-attacks fgsm,pgd,cw,aa | 
rnn-t3-rnn-trades-mnist      | GPU        | Xiong & Hsieh Table 3 (white-box, MNIST, 4-layer CNN), RNN-TRADES; T = 40 | --method rnn-trades --dataset mnist RNN_MNIST --eval-attacks fgsm,pgd,cw,rnn,aa | 
rnn-t4-pgd-at-cifar10        | GPU        | Xiong & Hsieh Table 4 (white-box, CIFAR-10, VGG-16), AdvTrain; T = 10 | --method pgd-at --dataset cifar10 --model vgg16 RNN_CIFAR --eval-attacks fgsm,pgd,cw,aa | 
rnn-t4-rnn-adv-cifar10       | GPU        | Xiong & Hsieh Table 4 (white-box, CIFAR-10, VGG-16), RNN-Adv; T = 10 | --method rnn-adv --dataset cifar10 --model vgg16 RNN_CIFAR --eval-attacks fgsm,pgd,cw,rnn,aa | 
rnn-t4-trades-cifar10        | GPU        | Xiong & Hsieh Table 4 (white-box, CIFAR-10, VGG-16), TRADES; T = 10 | --method trades --dataset cifar10 --model vgg16 RNN_CIFAR --eval-attacks fgsm,pgd,cw,aa | 
rnn-t4-rnn-trades-cifar10    | GPU        | Xiong & Hsieh Table 4 (white-box, CIFAR-10, VGG-16), RNN-TRADES; T = 10 | --method rnn-trades --dataset cifar10 --model vgg16 RNN_CIFAR --eval-attacks fgsm,pgd,cw,rnn,aa | 
rnn-t5-pgd-at-cifar10        | GPU        | Xiong & Hsieh Table 5 (white-box, CIFAR-10, WideResNet-34-10), AdvTrain; T = 10 | --method pgd-at --dataset cifar10 --model wrn RNN_CIFAR --eval-attacks fgsm,pgd,cw,aa | 
rnn-t5-rnn-adv-cifar10       | GPU        | Xiong & Hsieh Table 5 (white-box, CIFAR-10, WideResNet-34-10), RNN-Adv; T = 10 | --method rnn-adv --dataset cifar10 --model wrn RNN_CIFAR --eval-attacks fgsm,pgd,cw,rnn,aa | 
rnn-t5-trades-cifar10        | GPU        | Xiong & Hsieh Table 5 (white-box, CIFAR-10, WideResNet-34-10), TRADES; T = 10 | --method trades --dataset cifar10 --model wrn RNN_CIFAR --eval-attacks fgsm,pgd,cw,aa | 
rnn-t5-rnn-trades-cifar10    | GPU        | Xiong & Hsieh Table 5 (white-box, CIFAR-10, WideResNet-34-10), RNN-TRADES; T = 10 | --method rnn-trades --dataset cifar10 --model wrn RNN_CIFAR --eval-attacks fgsm,pgd,cw,rnn,aa | 
TABLE
)
# Xiong & Hsieh: no code and no readable full text; the baselines' official settings are used for every row
# (TRADES: CIFAR-10 eps 0.031, 10 steps of 0.007, lr 0.1 x0.1 at 75/90/100, 76 epochs, wd 2e-4, eval PGD-20 step
# 0.003; MNIST eps 0.3, 40 steps of 0.01, lr 0.01, 100 epochs), and T equals the baseline's step count.
# Each RNN row and its baseline row share every setting but the inner maximiser: the attack's BN mode is eval for all
# (TRADES' code and the RNN rows' default), so AdvTrain and AdvTrain+BLS do not differ from RNN-Adv in two things.
# The full-data MNIST pair (README, Reproduce the papers): eps 0.1 (at 0.3 MNISTNet stays at chance under PGD-10-AT at this
# budget), T = 10, evaluated with PGD-40 and AutoAttack on the first 1000 test images.
RNN_MNIST_PAIR="--eps 0.1 --model mnistnet --optimizer adam --lr 1e-3 --lr-schedule constant --epochs 3 --val-size 0 --attack-bn eval --steps 10 --step-size 0.025 --test-size 1000"
RNN_MNIST="--attack-bn eval --steps 40 --step-size 0.01 --epochs 100 --lr 0.01"
RNN_CIFAR="--attack-bn eval --eps 0.031 --steps 10 --step-size 0.007 --epochs 76 --lr 0.1 --weight-decay 2e-4 --lr-milestones 75,90,100 --lr-milestone-base 1 --eval-steps 20 --eval-step-size 0.003"
# Fast-BAT's setting (train.py defaults): PreActResNet-18, 20 epochs, cyclic lr 0 -> 0.2 -> 0 per iteration peaking
# at epoch 10 (--cyclic_milestone) with CyclicLR's momentum cycle, SGD momentum 0.9, wd 5e-4, batch 128, the last 10%
# of the training set for validation (SVHN: 7326 of 73257) and the best epoch chosen there by PGD-50-10 with step
# eps/4 (each row's --val-step-size); RA-PGD = PGD-50-10, step eps/4; RA-AA = AutoAttack's standard version (aa).
# CIFAR-100 adds RandomRotation(15) (datasets.py); SVHN has no augmentation.
# SVHN uses lr 0.05, this project's choice (a peak of 0.2 is known to diverge on SVHN; the Fast-BAT SVHN lr was not read).
FASTBAT="--normalize mean-std --preact-shortcut input --crop-pad zero --model preactresnet18 --epochs 20 --lr-schedule cyclic --lr 0.2 --lr-peak-epoch 10 --weight-decay 5e-4 --batch-size 128 --val-size 5000 --val-steps 50 --val-restarts 10 --eval-attacks fgsm,pgd,cw,aa --eval-steps 50 --eval-restarts 10"
# CIFAR-10 at CPU scale (README), every cpu-* row: PreActResNet-18 of base width 8 (1/64 of the FLOPs), Fast-BAT's
# input normalisation and cyclic lr 0 -> 0.2 -> 0 over 10 epochs (peak at 5), bf16 training, the best epoch by PGD-10 on
# the last 1,000 training images, tested on the first 1,000 test images (best.pt only). Seed 1: --seed 1 --out DIR.
CPU_COMMON="--normalize mean-std --input-std 0.2470,0.2435,0.2616 --preact-shortcut input --crop-pad zero --model preactresnet18 --width 8 --epochs 10 --lr-schedule cyclic --lr 0.2 --lr-peak-epoch 5 --weight-decay 5e-4 --batch-size 128 --val-size 1000 --val-steps 10 --precision bf16 --channels-last --test-size 1000 --no-eval-last"
# Fast-BAT Table 1 at CPU scale: 45,000 training images (the held-out 5,000's last 1,000 validate); PGD-50-10, AutoAttack.
CPU_FASTBAT="CPU_COMMON --train-size 45000 --eval-attacks pgd,aa --eval-steps 50 --eval-restarts 10"
# The learned attackers at CPU scale: all 49,000 training images; PGD-20 (eps/4), L2L's CW-l_inf, the checkpoint's own
# learned attack, AutoAttack. RNN rows and their PGD-3 baseline attack in eval mode with T = 3 steps of 2.5 eps / 3.
CPU_LEARNED="CPU_COMMON --eval-attacks pgd,cw-linf,aa"
# The L2L code's setting (train_l2l_*_cifar10.py): WRN-34-10, eps 0.031, 76 epochs, SGD lr 0.1 x0.1 when epoch >= 30,
# 60, 90 counting from 1, wd 2e-4, batch 128; evaluation "PGM-20" = PGD-20 step 0.003 (pgd_attack_cifar10.py) and
# "CW" = the optimisation-based CW-l_inf of cw.py (cw-linf).
L2L_CIFAR="--normalize none --crop-pad zero --model wrn --depth 34 --width 10 --eps 0.031 --epochs 76 --lr 0.1 --weight-decay 2e-4 --lr-milestones 30,60,90 --lr-milestone-base 1 --batch-size 128 --eval-steps 20 --eval-step-size 0.003"

# The fast-AT family in full, in the order of the GPU checklist.
REPRO_FAST="fast-at-cifar10 fastbat-fast-bat-cifar10-eps8 fastbat-fast-at-cifar10-eps8 fastbat-fast-at-ga-cifar10-eps8
fastbat-fast-bat-cifar10-eps16 fastbat-fast-at-cifar10-eps16 fastbat-fast-at-ga-cifar10-eps16 fastbat-pgd2-cifar10-eps8"
METHODS="plain pgd-at trades fast-at fast-at-ga fast-bat pgd-at-bls rnn-adv rnn-trades l2l-naive l2l-grad l2l-2step"

recipe_flags() {  # the l2l.py flags of recipe $1, with its name and paper numbers; empty if there is none
  echo "$RECIPES" | awk -F'|' -v n="$1" '{k=$1; gsub(/ /, "", k)} k==n {gsub(/ /, "", $5); p=$5;
    print $4 " --recipe " n (p == "" ? "" : " --paper " p)}' |
    sed "s|L2L_CIFAR|$L2L_CIFAR|; s|CPU_FASTBAT|$CPU_FASTBAT|; s|CPU_LEARNED|$CPU_LEARNED|; s|CPU_COMMON|$CPU_COMMON|; s|FASTBAT|$FASTBAT|; s|RNN_MNIST_PAIR|$RNN_MNIST_PAIR|; s|RNN_MNIST|$RNN_MNIST|; s|RNN_CIFAR|$RNN_CIFAR|"
}

gpu_check() {  # gpu-check [--data-dir DIR] [--out DIR] [--dry-run]: each phase under `timeout`, appending to gpu.md
  local data=data out=${OUT:-runs/gpu-check} dry=0 dev=cuda
  while [ $# -gt 0 ]; do
    case $1 in
      --data-dir) data=$2; shift 2 ;;
      --out) out=$2; shift 2 ;;
      --dry-run) dry=1; dev=cpu; shift ;;
      *) echo "run.sh gpu-check: unknown flag '$1' (flags: --data-dir DIR, --out DIR, --dry-run)" >&2; exit 2 ;;
    esac
  done
  if [ $dry = 0 ] && ! $PY -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "run.sh gpu-check: no CUDA device here; --dry-run runs the same phases on the CPU" >&2; exit 2
  fi
  [ -d "$data/MNIST" ] || [ -f "$data/mnist.npz" ] || { echo "run.sh gpu-check: no MNIST in --data-dir $data" >&2; exit 2; }
  mkdir -p "$out"
  local md=$out/gpu.md tests="stays_in_eps_ball or bf16 or lowers_its_loss or round_trip or autoattack or resume or reads_nothing or true_fp32"
  local bench=(--bench-steps 20) size=() limit=(timeout 240)
  if [ $dry = 1 ]; then
    tests="project_is_the_exact_projection"; bench=(--bench-steps 1 --bench-warmup 0 --dataset mnist --model smallcnn
      --steps 2 --batch-size 8); size=(--epochs 1 --train-size 256 --test-size 20 --eval-steps 2 --eval-restarts 1
      --apgd-steps 2 --fab-steps 2 --square-queries 10); limit=(timeout 120)
  fi
  { echo "# gpu-check, $(date -u '+%Y-%m-%d %H:%M UTC'), $($PY -c 'import torch; print(torch.cuda.get_device_name()
      if torch.cuda.is_available() else "no GPU")'), torch $($PY -c 'import torch; print(torch.__version__)')"
    echo; echo "## 1. Tests on $dev: pytest -k \"$tests\""; echo '```'
    L2L_TEST_DEVICE=$dev "${limit[@]}" $PY -m pytest -q -p no:cacheprovider test_l2l.py -k "$tests" 2>&1 | tail -n 5
    echo '```'; echo; echo "## 2. Speed: --benchmark, fp32, then bf16 + channels-last + compile"; echo '```'; } >> "$md"
  local fast_flags="--precision bf16 --channels-last --compile"
  [ $dry = 1 ] && fast_flags="--precision bf16 --channels-last"  # compiling takes a minute on a CPU
  for m in $( [ $dry = 1 ] && echo pgd-at || echo $METHODS); do
    for fast in "" "$fast_flags"; do
      # shellcheck disable=SC2086
      "${limit[@]}" $PY l2l.py --benchmark --method "$m" --dataset cifar10 --model preactresnet18 --batch-size 128 \
        --device $dev $fast "${bench[@]}" 2>&1 | tail -n 2 >> "$md" || echo "$m $fast: exit $?" >> "$md"
    done
  done
  { echo '```'; echo; echo "## 3. A paper row: fast-at-mnist (README, Reproduce the papers)"; echo '```'; } >> "$md"
  # shellcheck disable=SC2046
  "${limit[@]}" $PY l2l.py $(recipe_flags fast-at-mnist) --data-dir "$data" --device $dev --out "$out/fast-at-mnist" \
    --overwrite --quiet "${size[@]}" 2>&1 | tail -n 12 >> "$md" || echo "fast-at-mnist: exit $?" >> "$md"
  echo '```' >> "$md"
  echo "gpu-check: wrote $md"
}

attack_study() {  # pgd|learned CKPT OUT [flags]: README's fixed-model study at eps 8/255 (env STUDY_T, FIT, VARIANT)
  local part=${1:-} ckpt=${2:-} out=${3:-} T s; x() { awk "BEGIN{printf \"%.10g\", $1 * 8 / 255}"; }  # s * eps
  [[ $part =~ ^(pgd|learned)$ && -f $ckpt && -n $out ]] || { echo "attack-study: pgd|learned CKPT OUT" >&2; exit 2; }
  shift 3; local ev=(--eval-only "$ckpt" --eps 8/255 --test-size 10000 --quiet --overwrite)
  for T in ${STUDY_T:-1 2 3}; do
    if [ "$part" = pgd ]; then for s in 0.25 0.5 $(awk "BEGIN{print 2.5 / $T}") 1 1.25 2; do  # PGD-T at s * eps
      $PY l2l.py "${ev[@]}" --eval-attacks pgd --eval-steps "$T" --eval-step-size "$(x "$s")" "$@" --out "$out/pgd$T-$s"
    done; else $PY l2l.py "${ev[@]}" --eval-attacks rnn --rnn-fit "${FIT:-100}" --steps "$T" --step-size \
      "$(x "2.5 / $T")" "$@" --out "$out/rnn$T${VARIANT:+-$VARIANT}"; fi  # m_phi fitted, alpha 2.5 eps / T
  done; }

case "${1:-list}" in
  list|-h|--help) echo "$RECIPES" | awk -F'|' '{gsub(/ +$/, "", $1); gsub(/^ +| +$/, "", $3); line = sprintf("%-32s%s %s",
    $1, $2, $3); print (length(line) > 120 ? substr(line, 1, 117) "..." : line)}'
    echo "(bash run.sh show NAME: the whole description and the command)" ;;
  show) shift; echo "$RECIPES" | awk -F'|' -v n="${1:-}" '{k=$1; gsub(/ /, "", k); gsub(/^ +| +$/, "", $2)} k==n {
    print n " (" $2 "):" $3}'
    flags=$(recipe_flags "${1:-}"); [ -n "$flags" ] || { echo "run.sh: unknown recipe '${1:-}'" >&2; exit 2; }
    echo "  $PY l2l.py $flags --out runs/$1" ;;
  report) shift; if [ $# -eq 0 ]; then set -- runs/*/results.json; fi; exec $PY l2l.py --report "$@" ;;
  repro-fast) shift; for name in $REPRO_FAST; do bash "$0" "$name" "$@"; done ;;
  bench) shift
    for m in $METHODS; do $PY l2l.py --benchmark --method "$m" --dataset cifar10 --model preactresnet18 \
      --batch-size 128 "$@"; done ;;
  gpu-check) shift; gpu_check "$@" ;;
  attack-study) shift; attack_study "$@" ;;
  *) name=$1; shift
    flags=$(recipe_flags "$name")
    [ -n "$flags" ] || { echo "run.sh: unknown recipe '$name'; bash run.sh list shows them" >&2; exit 2; }
    if [ "$name" = quick-mnist ]; then
      echo "quick-mnist: eps 0.2, not the 0.3 of the MNIST papers (README, Run); AutoAttack on 50 test images" >&2
    fi
    # shellcheck disable=SC2086
    exec $PY l2l.py $flags --out "runs/$name" "$@" ;;
esac
