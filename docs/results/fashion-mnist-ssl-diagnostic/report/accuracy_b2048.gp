set datafile separator ','
set terminal pngcairo size 1100,650 noenhanced
set output 'accuracy_b2048.png'
set title 'linear-evaluation test top-1 per epoch of the head, batch 2048 (mean over seeds)'
set grid
set key outside right font ',8'
set xlabel 'epoch'
set ylabel 'test top-1'
plot 'accuracy_b2048.csv' using 1:2 every ::1 with linespoints lc 1 dt 1 pt 1 title 'tvlars update_norm_clamp=none weight_norm_clamp=none'
