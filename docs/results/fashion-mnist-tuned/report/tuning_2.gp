set datafile separator ','
set terminal pngcairo size 1100,650 noenhanced
set output 'tuning_2.png'
set title 'candidates'' final_val_top1 against lr: batch-size 16384'
set grid
set key outside right font ',8'
set xlabel 'lr (log scale)'
set logscale x
set ylabel 'final_val_top1'
plot 'tuning_2_series0.csv' using 1:2 every ::1 with linespoints lc 1 dt 1 pt 1 title 'sgd', \
     'tuning_2_series1.csv' using 1:2 every ::1 with linespoints lc 2 dt 1 pt 2 title 'lars', \
     'tuning_2_series2.csv' using 1:2 every ::1 with linespoints lc 3 dt 1 pt 3 title 'wa-lars', \
     'tuning_2_series3.csv' using 1:2 every ::1 with linespoints lc 4 dt 1 pt 4 title 'lamb', \
     'tuning_2_series4.csv' using 1:2 every ::1 with linespoints lc 5 dt 1 pt 5 title 'wa-lamb', \
     'tuning_2_series5.csv' using 1:2 every ::1 with linespoints lc 6 dt 1 pt 6 title 'tvlars-paper', \
     'tuning_2_series6.csv' using 1:2 every ::1 with linespoints lc 7 dt 1 pt 7 title 'tvlars opt lambda=0.5/T', \
     'tuning_2_series7.csv' using 1:2 every ::1 with linespoints lc 8 dt 1 pt 8 title 'tvlars opt lambda=2/T', \
     'tuning_2_series8.csv' using 1:2 every ::1 with linespoints lc 1 dt 2 pt 9 title 'tvlars opt lambda=5/T'
