set datafile separator ','
set terminal pngcairo size 1100,650 noenhanced
set output 'config0_tvlars-l1e-3__batch-size-1024__seed-0_grad_norms.png'
set title 'gradient norm |g| per layer: tvlars lambda=0.001'
set grid
set key outside right font ',8'
set xlabel 'step'
set ylabel '|g|'
set logscale y
plot 'config0_tvlars-l1e-3__batch-size-1024__seed-0_layers_wide.csv' using 1:4 every ::1 with lines lc 1 dt 1 pt 1 title 'fc1.weight', \
     'config0_tvlars-l1e-3__batch-size-1024__seed-0_layers_wide.csv' using 1:7 every ::1 with lines lc 2 dt 1 pt 2 title 'fc.weight'
