set datafile separator ','
set terminal pngcairo size 1100,650 noenhanced
set output 'tuning_0.png'
set title 'candidates'' final_val_top1 against lr'
set grid
set key outside right font ',8'
set xlabel 'lr (log scale)'
set logscale x
set ylabel 'final_val_top1'
plot 'tuning_0_series0.csv' using 1:2 every ::1 with linespoints lc 1 dt 1 pt 1 title 'lars', \
     'tuning_0_series1.csv' using 1:2 every ::1 with linespoints lc 2 dt 1 pt 2 title 'wa-lars', \
     'tuning_0_series2.csv' using 1:2 every ::1 with linespoints lc 3 dt 1 pt 3 title 'lars-barlowtwins', \
     'tuning_0_series3.csv' using 1:2 every ::1 with linespoints lc 4 dt 1 pt 4 title 'lamb', \
     'tuning_0_series4.csv' using 1:2 every ::1 with linespoints lc 5 dt 1 pt 5 title 'tvlars'
