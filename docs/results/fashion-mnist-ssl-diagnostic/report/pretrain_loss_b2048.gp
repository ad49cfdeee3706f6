set datafile separator ','
set terminal pngcairo size 1100,650 noenhanced
set output 'pretrain_loss_b2048.png'
set title 'pre-training loss per epoch, batch 2048 (mean over seeds)'
set grid
set key outside right font ',8'
set xlabel 'pre-training epoch'
set ylabel 'training loss (log scale)'
set logscale y
plot 'pretrain_loss_b2048.csv' using 1:2 every ::1 with linespoints lc 1 dt 1 pt 1 title 'tvlars update_norm_clamp=none weight_norm_clamp=none'
