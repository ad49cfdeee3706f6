set datafile separator ','
set terminal pngcairo size 1100,650 noenhanced
set output 'config7_lamb__lr-0.01__batch-size-4096__seed-1_grad_norms.png'
set title 'gradient norm |g| per layer: lamb lr=0.01'
set grid
set key outside right font ',8'
set xlabel 'step'
set ylabel '|g|'
set logscale y
plot 'config7_lamb__lr-0.01__batch-size-4096__seed-1_layers_wide.csv' using 1:4 every ::1 with lines lc 1 dt 1 pt 1 title 'conv1.weight', \
     'config7_lamb__lr-0.01__batch-size-4096__seed-1_layers_wide.csv' using 1:7 every ::1 with lines lc 2 dt 1 pt 2 title 'conv2.weight', \
     'config7_lamb__lr-0.01__batch-size-4096__seed-1_layers_wide.csv' using 1:10 every ::1 with lines lc 3 dt 1 pt 3 title 'fc1.weight', \
     'config7_lamb__lr-0.01__batch-size-4096__seed-1_layers_wide.csv' using 1:13 every ::1 with lines lc 4 dt 1 pt 4 title 'fc.weight'
