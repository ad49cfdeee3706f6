set datafile separator ','
set terminal pngcairo size 1100,650 noenhanced
set output 'config0_tvlars-no-clamps__lr-3.2__seed-1_schedule.png'
set title 'lr_t and phi_t per step: tvlars update_norm_clamp=none weight_norm_clamp=none'
set grid
set key outside right font ',8'
set xlabel 'step'
set ylabel 'lr_t'
set y2label 'phi_t'
set y2tics
set ytics nomirror
plot 'config0_tvlars-no-clamps__lr-3.2__seed-1_schedule.csv' using 1:2 every ::1 with lines title 'lr_t', \
     'config0_tvlars-no-clamps__lr-3.2__seed-1_schedule.csv' using 1:3 every ::1 axes x1y2 with lines title 'phi_t'
