set datafile separator ','
set terminal pngcairo size 1100,800 noenhanced
set output 'schedules_b256.png'
set multiplot layout 2,1 title 'learning rate lr_t and TVLARS factor phi_t, batch 256 (per step with telemetry, else per epoch)'
set grid
set key outside right font ',8'
set offsets 0, 0, graph 0.05, 0
set ylabel 'lr_t (log scale)'
set logscale y
plot 'schedules_b256_config0.csv' using 1:2 every ::1 with linespoints lc 1 dt 1 pt 1 title 'linear eval, random cnn backbone'
unset logscale y
set xlabel 'step'
set ylabel 'phi_t'
plot 'schedules_b256_config0.csv' using 1:3 every ::1 with linespoints lc 1 dt 1 pt 1 title 'linear eval, random cnn backbone'
unset multiplot
