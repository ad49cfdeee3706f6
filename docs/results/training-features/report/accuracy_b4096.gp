set datafile separator ','
set terminal pngcairo size 1100,650 noenhanced
set output 'accuracy_b4096.png'
set title 'test top-1 per epoch, batch 4096 (mean over seeds)'
set grid
set key outside right font ',8'
set xlabel 'epoch'
set ylabel 'test top-1'
plot 'accuracy_b4096.csv' using 1:2 every ::1 with linespoints lc 1 dt 1 pt 1 title 'lars precision=bf16', \
     'accuracy_b4096.csv' using 1:3 every ::1 with linespoints lc 2 dt 1 pt 2 title 'lars', \
     'accuracy_b4096.csv' using 1:4 every ::1 with linespoints lc 3 dt 1 pt 3 title 'lars schedule=poly', \
     'accuracy_b4096.csv' using 1:5 every ::1 with linespoints lc 4 dt 1 pt 4 title 'tvlars precision=bf16', \
     'accuracy_b4096.csv' using 1:6 every ::1 with linespoints lc 5 dt 1 pt 5 title 'tvlars', \
     'accuracy_b4096.csv' using 1:7 every ::1 with linespoints lc 6 dt 1 pt 6 title 'tvlars schedule=poly', \
     'accuracy_b4096.csv' using 1:8 every ::1 with linespoints lc 7 dt 1 pt 7 title 'lars mixup=0.2', \
     'accuracy_b4096.csv' using 1:9 every ::1 with linespoints lc 8 dt 1 pt 8 title 'tvlars mixup=0.2', \
     'accuracy_b4096.csv' using 1:10 every ::1 with linespoints lc 1 dt 2 pt 9 title 'lars label-smoothing=0.1', \
     'accuracy_b4096.csv' using 1:11 every ::1 with linespoints lc 2 dt 2 pt 10 title 'tvlars label-smoothing=0.1', \
     'accuracy_b4096.csv' using 1:12 every ::1 with linespoints lc 3 dt 2 pt 11 title 'lars ema-decay=0.9', \
     'accuracy_b4096.csv' using 1:13 every ::1 with linespoints lc 4 dt 2 pt 12 title 'tvlars ema-decay=0.9', \
     'accuracy_b4096.csv' using 1:14 every ::1 with linespoints lc 5 dt 2 pt 13 title 'lars ema-decay=0.99', \
     'accuracy_b4096.csv' using 1:15 every ::1 with linespoints lc 6 dt 2 pt 1 title 'tvlars ema-decay=0.99', \
     'accuracy_b4096.csv' using 1:16 every ::1 with linespoints lc 7 dt 2 pt 2 title 'lars cutmix=1', \
     'accuracy_b4096.csv' using 1:17 every ::1 with linespoints lc 8 dt 2 pt 3 title 'tvlars cutmix=1', \
     'accuracy_b4096.csv' using 1:18 every ::1 with linespoints lc 1 dt 3 pt 4 title 'lars clip-grad-norm=1', \
     'accuracy_b4096.csv' using 1:19 every ::1 with linespoints lc 2 dt 3 pt 5 title 'tvlars clip-grad-norm=1', \
     'accuracy_b4096.csv' using 1:20 every ::1 with linespoints lc 3 dt 3 pt 6 title 'lars bn-group-size=256', \
     'accuracy_b4096.csv' using 1:21 every ::1 with linespoints lc 4 dt 3 pt 7 title 'tvlars bn-group-size=256'
