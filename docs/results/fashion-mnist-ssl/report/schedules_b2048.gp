set datafile separator ','
set terminal pngcairo size 1100,800 noenhanced
set output 'schedules_b2048.png'
set multiplot layout 2,1 title 'learning rate lr_t and TVLARS factor phi_t, batch 2048 (per step with telemetry, else per epoch)'
set grid
set key outside right font ',8'
set offsets 0, 0, graph 0.05, 0
set ylabel 'lr_t (log scale)'
set logscale y
plot 'schedules_b2048_config0.csv' using 1:2 every ::1 with lines lc 1 dt 1 pt 1 title 'lamb', \
     'schedules_b2048_config1.csv' using 1:2 every ::1 with lines lc 2 dt 1 pt 2 title 'tvlars lr=0.4', \
     'schedules_b2048_config2.csv' using 1:2 every ::1 with lines lc 3 dt 1 pt 3 title 'lars:barlowtwins lr=0.8', \
     'schedules_b2048_config3.csv' using 1:2 every ::1 with lines lc 4 dt 1 pt 4 title 'wa-lars lr=1.6', \
     'schedules_b2048_config4.csv' using 1:2 every ::1 with lines lc 5 dt 1 pt 5 title 'lars lr=3.2'
unset logscale y
set xlabel 'step'
set ylabel 'phi_t'
plot 'schedules_b2048_config0.csv' using 1:3 every ::1 with lines lc 1 dt 1 pt 1 title 'lamb', \
     'schedules_b2048_config1.csv' using 1:3 every ::1 with lines lc 2 dt 1 pt 2 title 'tvlars lr=0.4', \
     'schedules_b2048_config2.csv' using 1:3 every ::1 with lines lc 3 dt 1 pt 3 title 'lars:barlowtwins lr=0.8', \
     'schedules_b2048_config3.csv' using 1:3 every ::1 with lines lc 4 dt 1 pt 4 title 'wa-lars lr=1.6', \
     'schedules_b2048_config4.csv' using 1:3 every ::1 with lines lc 5 dt 1 pt 5 title 'lars lr=3.2'
unset multiplot
