set datafile separator ','
set terminal pngcairo size 1100,650 noenhanced
set output 'config24_wa-lars__lr-4__batch-size-16384__seed-1_lnr_lines.png'
set title 'trust ratio per layer: wa-lars'
set grid
set key outside right font ',8'
set xlabel 'step'
set ylabel 'trust ratio'
set logscale y
plot 'config24_wa-lars__lr-4__batch-size-16384__seed-1_layers_wide.csv' using 1:2 every ::1 with lines lc 1 dt 1 pt 1 title 'conv1.weight', \
     'config24_wa-lars__lr-4__batch-size-16384__seed-1_layers_wide.csv' using 1:5 every ::1 with lines lc 2 dt 1 pt 2 title 'conv2.weight', \
     'config24_wa-lars__lr-4__batch-size-16384__seed-1_layers_wide.csv' using 1:8 every ::1 with lines lc 3 dt 1 pt 3 title 'fc1.weight', \
     'config24_wa-lars__lr-4__batch-size-16384__seed-1_layers_wide.csv' using 1:11 every ::1 with lines lc 4 dt 1 pt 4 title 'fc.weight'
