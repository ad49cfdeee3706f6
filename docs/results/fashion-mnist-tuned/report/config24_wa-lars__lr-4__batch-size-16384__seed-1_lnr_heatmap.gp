set datafile separator ','
set terminal pngcairo size 1100,400 noenhanced
set output 'config24_wa-lars__lr-4__batch-size-16384__seed-1_lnr_heatmap.png'
set title 'log10 trust ratio (LNR, incl. phi_t): wa-lars'
set grid
set key outside right font ',8'
set xlabel 'step'
set ytics ('conv1.weight' 0, 'conv2.weight' 1, 'fc1.weight' 2, 'fc.weight' 3) font ',7'
set yrange [-0.5:4-0.5]
set cblabel 'log10 r'
set palette rgb 33,13,10
unset key
set autoscale xfix
set style fill solid noborder
plot 'config24_wa-lars__lr-4__batch-size-16384__seed-1_layers.csv' using 1:2:(0.500000):(0.5):(log10($3)) every ::1 with boxxyerror lc palette
