set datafile separator ','
set terminal pngcairo size 1100,650 noenhanced
set output 'accuracy_b2048.png'
set title 'linear-evaluation test top-1 per epoch of the head, batch 2048 (mean over seeds)'
set grid
set key outside right font ',8'
set xlabel 'epoch'
set ylabel 'test top-1'
plot 'accuracy_b2048.csv' using 1:2 every ::1 with linespoints lc 1 dt 1 pt 1 title 'lamb', \
     'accuracy_b2048.csv' using 1:3 every ::1 with linespoints lc 2 dt 1 pt 2 title 'tvlars lr=0.4', \
     'accuracy_b2048.csv' using 1:4 every ::1 with linespoints lc 3 dt 1 pt 3 title 'lars:barlowtwins lr=0.8', \
     'accuracy_b2048.csv' using 1:5 every ::1 with linespoints lc 4 dt 1 pt 4 title 'wa-lars lr=1.6', \
     'accuracy_b2048.csv' using 1:6 every ::1 with linespoints lc 5 dt 1 pt 5 title 'lars lr=3.2'
