set datafile separator ','
set terminal pngcairo size 1100,800 noenhanced
set output 'schedules_b4096.png'
set multiplot layout 2,1 title 'learning rate lr_t and TVLARS factor phi_t, batch 4096 (per step with telemetry, else per epoch)'
set grid
set key outside right font ',8'
set offsets 0, 0, graph 0.05, 0
set ylabel 'lr_t (log scale)'
set logscale y
plot 'schedules_b4096_config0.csv' using 1:2 every ::1 with lines lc 1 dt 1 pt 1 title 'lars precision=bf16', \
     'schedules_b4096_config1.csv' using 1:2 every ::1 with lines lc 2 dt 1 pt 2 title 'lars', \
     'schedules_b4096_config2.csv' using 1:2 every ::1 with lines lc 3 dt 1 pt 3 title 'lars schedule=poly', \
     'schedules_b4096_config3.csv' using 1:2 every ::1 with lines lc 4 dt 1 pt 4 title 'tvlars precision=bf16', \
     'schedules_b4096_config4.csv' using 1:2 every ::1 with lines lc 5 dt 1 pt 5 title 'tvlars', \
     'schedules_b4096_config5.csv' using 1:2 every ::1 with lines lc 6 dt 1 pt 6 title 'tvlars schedule=poly', \
     'schedules_b4096_config6.csv' using 1:2 every ::1 with lines lc 7 dt 1 pt 7 title 'lars mixup=0.2', \
     'schedules_b4096_config7.csv' using 1:2 every ::1 with lines lc 8 dt 1 pt 8 title 'tvlars mixup=0.2', \
     'schedules_b4096_config8.csv' using 1:2 every ::1 with lines lc 1 dt 2 pt 9 title 'lars label-smoothing=0.1', \
     'schedules_b4096_config9.csv' using 1:2 every ::1 with lines lc 2 dt 2 pt 10 title 'tvlars label-smoothing=0.1', \
     'schedules_b4096_config10.csv' using 1:2 every ::1 with lines lc 3 dt 2 pt 11 title 'lars ema-decay=0.9', \
     'schedules_b4096_config11.csv' using 1:2 every ::1 with lines lc 4 dt 2 pt 12 title 'tvlars ema-decay=0.9', \
     'schedules_b4096_config12.csv' using 1:2 every ::1 with lines lc 5 dt 2 pt 13 title 'lars ema-decay=0.99', \
     'schedules_b4096_config13.csv' using 1:2 every ::1 with lines lc 6 dt 2 pt 1 title 'tvlars ema-decay=0.99', \
     'schedules_b4096_config14.csv' using 1:2 every ::1 with lines lc 7 dt 2 pt 2 title 'lars cutmix=1', \
     'schedules_b4096_config15.csv' using 1:2 every ::1 with lines lc 8 dt 2 pt 3 title 'tvlars cutmix=1', \
     'schedules_b4096_config16.csv' using 1:2 every ::1 with lines lc 1 dt 3 pt 4 title 'lars clip-grad-norm=1', \
     'schedules_b4096_config17.csv' using 1:2 every ::1 with lines lc 2 dt 3 pt 5 title 'tvlars clip-grad-norm=1', \
     'schedules_b4096_config18.csv' using 1:2 every ::1 with lines lc 3 dt 3 pt 6 title 'lars bn-group-size=256', \
     'schedules_b4096_config19.csv' using 1:2 every ::1 with lines lc 4 dt 3 pt 7 title 'tvlars bn-group-size=256'
unset logscale y
set xlabel 'step'
set ylabel 'phi_t'
plot 'schedules_b4096_config0.csv' using 1:3 every ::1 with lines lc 1 dt 1 pt 1 title 'lars precision=bf16', \
     'schedules_b4096_config1.csv' using 1:3 every ::1 with lines lc 2 dt 1 pt 2 title 'lars', \
     'schedules_b4096_config2.csv' using 1:3 every ::1 with lines lc 3 dt 1 pt 3 title 'lars schedule=poly', \
     'schedules_b4096_config3.csv' using 1:3 every ::1 with lines lc 4 dt 1 pt 4 title 'tvlars precision=bf16', \
     'schedules_b4096_config4.csv' using 1:3 every ::1 with lines lc 5 dt 1 pt 5 title 'tvlars', \
     'schedules_b4096_config5.csv' using 1:3 every ::1 with lines lc 6 dt 1 pt 6 title 'tvlars schedule=poly', \
     'schedules_b4096_config6.csv' using 1:3 every ::1 with lines lc 7 dt 1 pt 7 title 'lars mixup=0.2', \
     'schedules_b4096_config7.csv' using 1:3 every ::1 with lines lc 8 dt 1 pt 8 title 'tvlars mixup=0.2', \
     'schedules_b4096_config8.csv' using 1:3 every ::1 with lines lc 1 dt 2 pt 9 title 'lars label-smoothing=0.1', \
     'schedules_b4096_config9.csv' using 1:3 every ::1 with lines lc 2 dt 2 pt 10 title 'tvlars label-smoothing=0.1', \
     'schedules_b4096_config10.csv' using 1:3 every ::1 with lines lc 3 dt 2 pt 11 title 'lars ema-decay=0.9', \
     'schedules_b4096_config11.csv' using 1:3 every ::1 with lines lc 4 dt 2 pt 12 title 'tvlars ema-decay=0.9', \
     'schedules_b4096_config12.csv' using 1:3 every ::1 with lines lc 5 dt 2 pt 13 title 'lars ema-decay=0.99', \
     'schedules_b4096_config13.csv' using 1:3 every ::1 with lines lc 6 dt 2 pt 1 title 'tvlars ema-decay=0.99', \
     'schedules_b4096_config14.csv' using 1:3 every ::1 with lines lc 7 dt 2 pt 2 title 'lars cutmix=1', \
     'schedules_b4096_config15.csv' using 1:3 every ::1 with lines lc 8 dt 2 pt 3 title 'tvlars cutmix=1', \
     'schedules_b4096_config16.csv' using 1:3 every ::1 with lines lc 1 dt 3 pt 4 title 'lars clip-grad-norm=1', \
     'schedules_b4096_config17.csv' using 1:3 every ::1 with lines lc 2 dt 3 pt 5 title 'tvlars clip-grad-norm=1', \
     'schedules_b4096_config18.csv' using 1:3 every ::1 with lines lc 3 dt 3 pt 6 title 'lars bn-group-size=256', \
     'schedules_b4096_config19.csv' using 1:3 every ::1 with lines lc 4 dt 3 pt 7 title 'tvlars bn-group-size=256'
unset multiplot
