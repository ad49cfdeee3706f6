set datafile separator ','
set terminal pngcairo size 1000,600 noenhanced
set output 'pretrain_resnet20/bench_pretrain.png'
set title 'pretrain speed, Barlow Twins, resnet20 + projector 1024-1024-1024, lars, fp32, 2 thread(s)'
set xlabel 'batch size'
set ylabel 'images/s'
set key outside right
set grid
set logscale x 2
set y2label 'step time (s)'
set y2tics
set ytics nomirror
plot 'pretrain_resnet20/bench_pretrain.csv' using 1:($3) every ::1 with linespoints title 'largebatch images/s', \
     'pretrain_resnet20/bench_pretrain.csv' using 1:($5) every ::1 with linespoints title 'PyTorch Python images/s', \
     'pretrain_resnet20/bench_pretrain.csv' using 1:($2) every ::1 axes x1y2 with linespoints title 'largebatch step time', \
     'pretrain_resnet20/bench_pretrain.csv' using 1:($4) every ::1 axes x1y2 with linespoints title 'PyTorch Python step time'
