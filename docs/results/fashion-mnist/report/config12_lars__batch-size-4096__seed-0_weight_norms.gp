set datafile separator ','
set terminal pngcairo size 1100,650 noenhanced
set output 'config12_lars__batch-size-4096__seed-0_weight_norms.png'
set title 'weight norm |w| per layer: lars'
set grid
set key outside right font ',8'
set xlabel 'step'
set ylabel '|w|'
set logscale y
plot 'config12_lars__batch-size-4096__seed-0_layers_wide.csv' using 1:3 every ::1 with lines lc 1 dt 1 pt 1 title 'fc1.weight', \
     'config12_lars__batch-size-4096__seed-0_layers_wide.csv' using 1:6 every ::1 with lines lc 2 dt 1 pt 2 title 'fc.weight'
