set datafile separator ','
set terminal pngcairo size 1100,800 noenhanced
set output 'schedules_b16384.png'
set multiplot layout 2,1 title 'learning rate lr_t and TVLARS factor phi_t, batch 16384 (per step with telemetry, else per epoch)'
set grid
set key outside right font ',8'
set offsets 0, 0, graph 0.05, 0
set ylabel 'lr_t (log scale)'
set logscale y
plot 'schedules_b16384_config0.csv' using 1:2 every ::1 with lines lc 1 dt 1 pt 1 title 'lamb lr=0.02', \
     'schedules_b16384_config1.csv' using 1:2 every ::1 with linespoints lc 2 dt 1 pt 2 title 'sgd lr=0.025 lr-scaling=sqrt', \
     'schedules_b16384_config2.csv' using 1:2 every ::1 with lines lc 3 dt 1 pt 3 title 'wa-lamb lr=0.04', \
     'schedules_b16384_config3.csv' using 1:2 every ::1 with lines lc 4 dt 1 pt 4 title 'tvlars lambda=0.5/T lr=2', \
     'schedules_b16384_config4.csv' using 1:2 every ::1 with lines lc 5 dt 1 pt 5 title 'lars lr=2', \
     'schedules_b16384_config5.csv' using 1:2 every ::1 with lines lc 6 dt 1 pt 6 title 'tvlars:paper lr=2', \
     'schedules_b16384_config6.csv' using 1:2 every ::1 with lines lc 7 dt 1 pt 7 title 'wa-lars'
unset logscale y
set xlabel 'step'
set ylabel 'phi_t'
plot 'schedules_b16384_config0.csv' using 1:3 every ::1 with lines lc 1 dt 1 pt 1 title 'lamb lr=0.02', \
     'schedules_b16384_config1.csv' using 1:3 every ::1 with linespoints lc 2 dt 1 pt 2 title 'sgd lr=0.025 lr-scaling=sqrt', \
     'schedules_b16384_config2.csv' using 1:3 every ::1 with lines lc 3 dt 1 pt 3 title 'wa-lamb lr=0.04', \
     'schedules_b16384_config3.csv' using 1:3 every ::1 with lines lc 4 dt 1 pt 4 title 'tvlars lambda=0.5/T lr=2', \
     'schedules_b16384_config4.csv' using 1:3 every ::1 with lines lc 5 dt 1 pt 5 title 'lars lr=2', \
     'schedules_b16384_config5.csv' using 1:3 every ::1 with lines lc 6 dt 1 pt 6 title 'tvlars:paper lr=2', \
     'schedules_b16384_config6.csv' using 1:3 every ::1 with lines lc 7 dt 1 pt 7 title 'wa-lars'
unset multiplot
