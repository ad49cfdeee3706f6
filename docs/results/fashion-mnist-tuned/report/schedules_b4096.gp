set datafile separator ','
set terminal pngcairo size 1100,800 noenhanced
set output 'schedules_b4096.png'
set multiplot layout 2,1 title 'learning rate lr_t and TVLARS factor phi_t, batch 4096 (per step with telemetry, else per epoch)'
set grid
set key outside right font ',8'
set offsets 0, 0, graph 0.05, 0
set ylabel 'lr_t (log scale)'
set logscale y
plot 'schedules_b4096_config0.csv' using 1:2 every ::1 with lines lc 1 dt 1 pt 1 title 'lamb lr=0.01', \
     'schedules_b4096_config1.csv' using 1:2 every ::1 with lines lc 2 dt 1 pt 2 title 'wa-lamb lr=0.04', \
     'schedules_b4096_config2.csv' using 1:2 every ::1 with linespoints lc 3 dt 1 pt 3 title 'sgd lr=0.05 lr-scaling=sqrt', \
     'schedules_b4096_config3.csv' using 1:2 every ::1 with lines lc 4 dt 1 pt 4 title 'tvlars:paper lr=2', \
     'schedules_b4096_config4.csv' using 1:2 every ::1 with lines lc 5 dt 1 pt 5 title 'wa-lars lr=2', \
     'schedules_b4096_config5.csv' using 1:2 every ::1 with lines lc 6 dt 1 pt 6 title 'tvlars lambda=2/T', \
     'schedules_b4096_config6.csv' using 1:2 every ::1 with lines lc 7 dt 1 pt 7 title 'lars', \
     'schedules_b4096_config7.csv' using 1:2 every ::1 with linespoints lc 8 dt 1 pt 8 title 'tvlars lambda=2/T init=kaiming-normal', \
     'schedules_b4096_config8.csv' using 1:2 every ::1 with linespoints lc 1 dt 2 pt 9 title 'lars init=kaiming-normal', \
     'schedules_b4096_config9.csv' using 1:2 every ::1 with linespoints lc 2 dt 2 pt 10 title 'tvlars lambda=2/T init=xavier-uniform', \
     'schedules_b4096_config10.csv' using 1:2 every ::1 with linespoints lc 3 dt 2 pt 11 title 'lars init=xavier-uniform'
unset logscale y
set xlabel 'step'
set ylabel 'phi_t'
plot 'schedules_b4096_config0.csv' using 1:3 every ::1 with lines lc 1 dt 1 pt 1 title 'lamb lr=0.01', \
     'schedules_b4096_config1.csv' using 1:3 every ::1 with lines lc 2 dt 1 pt 2 title 'wa-lamb lr=0.04', \
     'schedules_b4096_config2.csv' using 1:3 every ::1 with linespoints lc 3 dt 1 pt 3 title 'sgd lr=0.05 lr-scaling=sqrt', \
     'schedules_b4096_config3.csv' using 1:3 every ::1 with lines lc 4 dt 1 pt 4 title 'tvlars:paper lr=2', \
     'schedules_b4096_config4.csv' using 1:3 every ::1 with lines lc 5 dt 1 pt 5 title 'wa-lars lr=2', \
     'schedules_b4096_config5.csv' using 1:3 every ::1 with lines lc 6 dt 1 pt 6 title 'tvlars lambda=2/T', \
     'schedules_b4096_config6.csv' using 1:3 every ::1 with lines lc 7 dt 1 pt 7 title 'lars', \
     'schedules_b4096_config7.csv' using 1:3 every ::1 with linespoints lc 8 dt 1 pt 8 title 'tvlars lambda=2/T init=kaiming-normal', \
     'schedules_b4096_config8.csv' using 1:3 every ::1 with linespoints lc 1 dt 2 pt 9 title 'lars init=kaiming-normal', \
     'schedules_b4096_config9.csv' using 1:3 every ::1 with linespoints lc 2 dt 2 pt 10 title 'tvlars lambda=2/T init=xavier-uniform', \
     'schedules_b4096_config10.csv' using 1:3 every ::1 with linespoints lc 3 dt 2 pt 11 title 'lars init=xavier-uniform'
unset multiplot
