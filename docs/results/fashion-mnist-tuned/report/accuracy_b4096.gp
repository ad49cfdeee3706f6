set datafile separator ','
set terminal pngcairo size 1100,650 noenhanced
set output 'accuracy_b4096.png'
set title 'test top-1 per epoch, batch 4096 (mean over seeds)'
set grid
set key outside right font ',8'
set xlabel 'epoch'
set ylabel 'test top-1'
plot 'accuracy_b4096.csv' using 1:2 every ::1 with linespoints lc 1 dt 1 pt 1 title 'lamb lr=0.01', \
     'accuracy_b4096.csv' using 1:3 every ::1 with linespoints lc 2 dt 1 pt 2 title 'wa-lamb lr=0.04', \
     'accuracy_b4096.csv' using 1:4 every ::1 with linespoints lc 3 dt 1 pt 3 title 'sgd lr=0.05 lr-scaling=sqrt', \
     'accuracy_b4096.csv' using 1:5 every ::1 with linespoints lc 4 dt 1 pt 4 title 'tvlars:paper lr=2', \
     'accuracy_b4096.csv' using 1:6 every ::1 with linespoints lc 5 dt 1 pt 5 title 'wa-lars lr=2', \
     'accuracy_b4096.csv' using 1:7 every ::1 with linespoints lc 6 dt 1 pt 6 title 'tvlars lambda=2/T', \
     'accuracy_b4096.csv' using 1:8 every ::1 with linespoints lc 7 dt 1 pt 7 title 'lars', \
     'accuracy_b4096.csv' using 1:9 every ::1 with linespoints lc 8 dt 1 pt 8 title 'tvlars lambda=2/T init=kaiming-normal', \
     'accuracy_b4096.csv' using 1:10 every ::1 with linespoints lc 1 dt 2 pt 9 title 'lars init=kaiming-normal', \
     'accuracy_b4096.csv' using 1:11 every ::1 with linespoints lc 2 dt 2 pt 10 title 'tvlars lambda=2/T init=xavier-uniform', \
     'accuracy_b4096.csv' using 1:12 every ::1 with linespoints lc 3 dt 2 pt 11 title 'lars init=xavier-uniform'
