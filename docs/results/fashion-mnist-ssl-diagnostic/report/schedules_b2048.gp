set datafile separator ','
set terminal pngcairo size 1100,800 noenhanced
set output 'schedules_b2048.png'
set multiplot layout 2,1 title 'learning rate lr_t and TVLARS factor phi_t, batch 2048 (per step with telemetry, else per epoch)'
set grid
set key outside right font ',8'
set offsets 0, 0, graph 0.05, 0
set ylabel 'lr_t (log scale)'
set logscale y
plot 'schedules_b2048_config0.csv' using 1:2 every ::1 with lines lc 1 dt 1 pt 1 title 'tvlars update_norm_clamp=none weight_norm_clamp=none'
unset logscale y
set xlabel 'step'
set ylabel 'phi_t'
plot 'schedules_b2048_config0.csv' using 1:3 every ::1 with lines lc 1 dt 1 pt 1 title 'tvlars update_norm_clamp=none weight_norm_clamp=none'
unset multiplot
