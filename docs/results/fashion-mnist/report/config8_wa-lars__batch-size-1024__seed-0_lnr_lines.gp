set datafile separator ','
set terminal pngcairo size 1100,650 noenhanced
set output 'config8_wa-lars__batch-size-1024__seed-0_lnr_lines.png'
set title 'trust ratio per layer: wa-lars'
set grid
set key outside right font ',8'
set xlabel 'step'
set ylabel 'trust ratio'
set logscale y
plot 'config8_wa-lars__batch-size-1024__seed-0_layers_wide.csv' using 1:2 every ::1 with lines lc 1 dt 1 pt 1 title 'fc1.weight', \
     'config8_wa-lars__batch-size-1024__seed-0_layers_wide.csv' using 1:5 every ::1 with lines lc 2 dt 1 pt 2 title 'fc.weight'
