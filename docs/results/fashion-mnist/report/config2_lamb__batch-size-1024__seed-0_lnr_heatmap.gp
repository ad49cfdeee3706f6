set datafile separator ','
set terminal pngcairo size 1100,400 noenhanced
set output 'config2_lamb__batch-size-1024__seed-0_lnr_heatmap.png'
set title 'log10 trust ratio (LNR, incl. phi_t): lamb'
set grid
set key outside right font ',8'
set xlabel 'step'
set ytics ('fc1.weight' 0, 'fc.weight' 1) font ',7'
set yrange [-0.5:2-0.5]
set cblabel 'log10 r'
set palette rgb 33,13,10
unset key
set autoscale xfix
set style fill solid noborder
plot 'config2_lamb__batch-size-1024__seed-0_layers.csv' using 1:2:(2.500000):(0.5):(log10($3)) every ::1 with boxxyerror lc palette
